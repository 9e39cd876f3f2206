package region

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"strconv"
)

// MaxBody bounds an add-checkpoint request: a checkpoint, its
// cosignatures and 63 proof hashes fit many times over.
const MaxBody = 16 << 10

// maxProof is the longest consistency proof a tree of 2^63 entries needs.
const maxProof = 63

// addCheckpoint is one parsed tlog-witness add-checkpoint request.
type addCheckpoint struct {
	oldSize    uint64
	proof      [][]byte
	checkpoint []byte
}

// parseAddCheckpoint reads the C2SP tlog-witness request body: "old N",
// up to 63 base64 SHA-256 hashes one per line, an empty line, then the
// signed checkpoint. It names what is wrong, for the 400's message.
func parseAddCheckpoint(body []byte) (addCheckpoint, error) {
	var req addCheckpoint
	line, rest, ok := bytes.Cut(body, []byte("\n"))
	if !ok {
		return req, errors.New(`the body must start with an "old <size>" line`)
	}
	num, found := bytes.CutPrefix(line, []byte("old "))
	if !found {
		return req, fmt.Errorf(`first line %q: want "old <size>"`, clip(line))
	}
	if len(num) == 0 || (num[0] == '0' && len(num) > 1) {
		return req, fmt.Errorf(`first line %q: the size must be a decimal without leading zeros`, clip(line))
	}
	n, err := strconv.ParseUint(string(num), 10, 64)
	if err != nil {
		return req, fmt.Errorf(`first line %q: the size must be a decimal that fits 64 bits`, clip(line))
	}
	req.oldSize = n
	for {
		line, rest, ok = bytes.Cut(rest, []byte("\n"))
		if !ok {
			return req, errors.New("no empty line between the consistency proof and the checkpoint")
		}
		if len(line) == 0 {
			break
		}
		if len(req.proof) == maxProof {
			return req, fmt.Errorf("consistency proof: more than %d hashes", maxProof)
		}
		h, err := base64.StdEncoding.Strict().DecodeString(string(line))
		if err != nil || len(h) != 32 {
			return req, fmt.Errorf("consistency proof line %d: %q is not a base64 SHA-256 hash", len(req.proof)+1, clip(line))
		}
		req.proof = append(req.proof, h)
	}
	if len(rest) == 0 {
		return req, errors.New("no checkpoint after the consistency proof")
	}
	req.checkpoint = rest
	return req, nil
}

// clip keeps quoted input short in messages.
func clip(b []byte) []byte {
	if len(b) > 64 {
		return append(b[:64:64], "..."...)
	}
	return b
}
