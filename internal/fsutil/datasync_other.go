//go:build !linux

package fsutil

import "os"

// DataSync makes f's data durable; fsync where fdatasync is not offered.
func DataSync(f *os.File) error { return f.Sync() }
