package receipt

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestTornJSONLTailIsTruncated: a last line without its newline (a crash
// mid-append, before the fsync returned) is cut at open, so the next
// append starts on a line of its own and every line parses afterwards.
func TestTornJSONLTailIsTruncated(t *testing.T) {
	type rec struct {
		N int `json:"n"`
	}
	for name, torn := range map[string]string{
		"half a line":          `{"n":`,
		"a whole line, no \\n": `{"n":9}`,
	} {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "keys.jsonl")
			if err := os.WriteFile(path, []byte("{\"n\":1}\n{\"n\":2}\n"+torn), 0o600); err != nil {
				t.Fatal(err)
			}
			var logs bytes.Buffer
			got, err := readJSONLines[rec](path, testLogger(&logs))
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != 2 || got[1].N != 2 {
				t.Fatalf("read %v, want the two whole lines", got)
			}
			if !strings.Contains(logs.String(), path) || !strings.Contains(logs.String(), "bytes_dropped="+strconv.Itoa(len(torn))) {
				t.Fatalf("no warning naming the file and the bytes dropped: %q", logs.String())
			}
			if err := appendJSONLine(path, rec{N: 3}); err != nil {
				t.Fatal(err)
			}
			raw, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			lines := strings.Split(strings.TrimSuffix(string(raw), "\n"), "\n")
			if len(lines) != 3 {
				t.Fatalf("file has %d lines, want 3:\n%s", len(lines), raw)
			}
			for i, l := range lines {
				var r rec
				if err := json.Unmarshal([]byte(l), &r); err != nil || r.N != i+1 {
					t.Fatalf("line %d %q: %v", i+1, l, err)
				}
			}
		})
	}
}

// TestCorruptJSONLLineIsAnError: a whole line (newline-terminated, so its
// write finished) that does not parse is corruption, not a torn tail.
func TestCorruptJSONLLineIsAnError(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keys.jsonl")
	if err := os.WriteFile(path, []byte("{\"n\":1}\nnot json\n{\"n\":3}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := readJSONLines[struct{ N int }](path, discard()); err == nil || !strings.Contains(err.Error(), "line 2") {
		t.Fatalf("corrupt line: %v", err)
	}
}
