package promotion

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestOpenBoltStoreErrors: a data dir knhk cannot write names the file
// once and says why, without blaming another knhk; a locked file does.
func TestOpenBoltStoreErrors(t *testing.T) {
	if os.Geteuid() != 0 {
		dir := filepath.Join(t.TempDir(), "ro")
		if err := os.Mkdir(dir, 0o500); err != nil {
			t.Fatal(err)
		}
		_, err := OpenBoltStore(dir)
		if err == nil || strings.Count(err.Error(), dir) != 1 || strings.Contains(err.Error(), "another knhk") ||
			!strings.Contains(err.Error(), "permission denied") {
			t.Errorf("read-only dir: %v", err)
		}
	}
	// As root, permissions do not stop us; a path under a file does.
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := OpenBoltStore(file)
	if err == nil || strings.Count(err.Error(), file) != 1 || strings.Contains(err.Error(), "another knhk") {
		t.Errorf("unusable dir: %v", err)
	}

	dir := t.TempDir()
	s, err := OpenBoltStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := OpenBoltStore(dir); err == nil || !strings.Contains(err.Error(), "another knhk") {
		t.Errorf("locked store: %v", err)
	}
}
