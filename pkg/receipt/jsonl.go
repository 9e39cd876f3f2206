package receipt

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
)

// appendJSONLine appends v as one line to path (created 0600) and fsyncs:
// what it records (a key) must survive a crash before anything uses it.
func appendJSONLine(path string, v any) error {
	line, err := json.Marshal(v)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	_, werr := f.Write(append(line, '\n'))
	serr := f.Sync()
	cerr := f.Close()
	if err := errors.Join(werr, serr, cerr); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

// readJSONLines decodes every line of path; a missing file has none. A
// torn last line (a crash mid-append, before its fsync returned, so before
// anything used it) is ignored.
func readJSONLines[T any](path string) ([]T, error) {
	f, err := os.Open(path)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	var out []T
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for n := 1; sc.Scan(); n++ {
		var v T
		if err := json.Unmarshal(sc.Bytes(), &v); err != nil {
			if !hasMore(sc) {
				break
			}
			return nil, fmt.Errorf("%s line %d: %w", path, n, err)
		}
		out = append(out, v)
	}
	return out, sc.Err()
}

func hasMore(sc *bufio.Scanner) bool { return sc.Scan() }
