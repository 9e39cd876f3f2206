package region

import (
	"bytes"
	"strings"
	"testing"
)

func TestParseAddCheckpoint(t *testing.T) {
	h := "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
	req, err := parseAddCheckpoint([]byte("old 7\n" + h + "\n" + h + "\n\norigin\n9\nroot\n\n— sig\n"))
	if err != nil {
		t.Fatal(err)
	}
	if req.oldSize != 7 || len(req.proof) != 2 || !bytes.HasPrefix(req.checkpoint, []byte("origin\n9\n")) {
		t.Fatalf("%+v", req)
	}
	for in, want := range map[string]string{
		"":                               `"old <size>" line`,
		"new 1\n\ncp":                    `want "old <size>"`,
		"old 01\n\ncp":                   "leading zeros",
		"old 18446744073709551616\n\ncp": "fits 64 bits",
		"old 1\n" + h + "\ncp":           "no empty line",
		"old 1\nAAAA\n\ncp":              "not a base64 SHA-256",
		"old 1\n\n":                      "no checkpoint",
		"old 1\n" + strings.Repeat(h+"\n", 64) + "\ncp": "more than 63",
	} {
		if _, err := parseAddCheckpoint([]byte(in)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v, want %q", in, err, want)
		}
	}
}

func FuzzParseAddCheckpoint(f *testing.F) {
	f.Add([]byte("old 0\n\norigin\n0\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n\n— x AAAA\n"))
	f.Add([]byte("old 3\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n\ncp"))
	f.Fuzz(func(t *testing.T, b []byte) {
		req, err := parseAddCheckpoint(b)
		if err != nil {
			return
		}
		if len(req.proof) > maxProof || len(req.checkpoint) == 0 {
			t.Fatalf("accepted %q as %+v", b, req)
		}
		for _, p := range req.proof {
			if len(p) != 32 {
				t.Fatalf("a %d-byte proof hash", len(p))
			}
		}
	})
}
