package fsutil

import (
	"os"

	"golang.org/x/sys/unix"
)

// DataSync makes f's data and size durable (fdatasync: not its times).
func DataSync(f *os.File) error { return unix.Fdatasync(int(f.Fd())) }
