package receipt

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/knhk/knhk/internal/fsutil"
)

// appendJSONLine appends v as one line to path (created 0600) and fsyncs
// the file and its directory: what it records (a key) must survive a
// crash before anything uses it, and a new file's name is only durable
// once its directory is synced. Appends are rare (a key rotation), so the
// directory is synced every time rather than only on creation.
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
	if err := errors.Join(werr, serr, cerr, fsutil.SyncDir(filepath.Dir(path))); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

// readJSONLines decodes every line of path; a missing file has none. A
// torn tail — bytes after the last newline, from a crash mid-append before
// its fsync returned, so before anything used it — is cut off the file
// (with a warning), so the next append starts on a line of its own. A
// whole line that does not parse is corruption, and an error.
func readJSONLines[T any](path string, log *slog.Logger) ([]T, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if whole := bytes.LastIndexByte(b, '\n') + 1; whole < len(b) {
		if err := truncate(path, int64(whole)); err != nil {
			return nil, fmt.Errorf("%s: cutting a torn last line: %w", path, err)
		}
		log.Warn("cut a torn last line (a crash mid-write) off a key file", "file", path, "bytes_dropped", len(b)-whole)
		b = b[:whole]
	}
	if len(b) == 0 {
		return nil, nil
	}
	var out []T
	for n, line := range bytes.Split(bytes.TrimSuffix(b, []byte{'\n'}), []byte{'\n'}) {
		var v T
		if err := json.Unmarshal(line, &v); err != nil {
			return nil, fmt.Errorf("%s line %d: %w", path, n+1, err)
		}
		out = append(out, v)
	}
	return out, nil
}

func truncate(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	terr := f.Truncate(size)
	serr := f.Sync()
	return errors.Join(terr, serr, f.Close())
}
