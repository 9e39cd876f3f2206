package region

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// The C2SP tlog-mirror add-entries body: a header, then entry packages
// aligned to the 256-entry bundles of tlog-tiles.
const (
	bundleWidth = 256
	// maxPackages is the most packages one request may carry (the spec's
	// client limit: 32 packages, 8192 entries).
	maxPackages = 32
	maxHashes   = 63
)

// addEntriesHeader is the fixed part of an add-entries body.
type addEntriesHeader struct {
	origin     string
	start, end uint64 // upload_start, upload_end
	ticket     []byte
}

// pkg is one entry package: entries [start, end) and a proof.
type pkg struct {
	start, end uint64
	entries    [][]byte
	proof      [][]byte
}

// packageBounds is package i of the canonical sequence for [start, end).
func packageBounds(start, end uint64, i uint64) (uint64, uint64) {
	rs := start / bundleWidth * bundleWidth
	return max(start, rs+i*bundleWidth), min(end, rs+(i+1)*bundleWidth)
}

// numPackages is how many packages the canonical sequence has.
func numPackages(start, end uint64) uint64 {
	if start >= end {
		return 0
	}
	rs := start / bundleWidth * bundleWidth
	re := (end + bundleWidth - 1) / bundleWidth * bundleWidth
	return (re - rs) / bundleWidth
}

func readHeader(r *bufio.Reader) (addEntriesHeader, error) {
	var h addEntriesHeader
	var n uint16
	if err := binary.Read(r, binary.BigEndian, &n); err != nil {
		return h, errors.New("log_origin_size: truncated")
	}
	if n == 0 {
		return h, errors.New("log_origin: empty")
	}
	origin := make([]byte, n)
	if _, err := io.ReadFull(r, origin); err != nil {
		return h, errors.New("log_origin: truncated")
	}
	h.origin = string(origin)
	if err := binary.Read(r, binary.BigEndian, &h.start); err != nil {
		return h, errors.New("upload_start: truncated")
	}
	if err := binary.Read(r, binary.BigEndian, &h.end); err != nil {
		return h, errors.New("upload_end: truncated")
	}
	if h.start > h.end {
		return h, fmt.Errorf("upload_start %d is past upload_end %d", h.start, h.end)
	}
	if err := binary.Read(r, binary.BigEndian, &n); err != nil {
		return h, errors.New("ticket_size: truncated")
	}
	h.ticket = make([]byte, n)
	if _, err := io.ReadFull(r, h.ticket); err != nil {
		return h, errors.New("ticket: truncated")
	}
	return h, nil
}

// readPackage reads package [start, end); io.EOF before its first byte
// means the request ended on a package boundary.
func readPackage(r *bufio.Reader, start, end uint64) (pkg, error) {
	p := pkg{start: start, end: end, entries: make([][]byte, 0, end-start)}
	if _, err := r.Peek(1); errors.Is(err, io.EOF) {
		return p, io.EOF
	}
	for i := start; i < end; i++ {
		var n uint16
		if err := binary.Read(r, binary.BigEndian, &n); err != nil {
			return p, fmt.Errorf("entry %d: length truncated", i)
		}
		e := make([]byte, n)
		if _, err := io.ReadFull(r, e); err != nil {
			return p, fmt.Errorf("entry %d: truncated", i)
		}
		p.entries = append(p.entries, e)
	}
	nh, err := r.ReadByte()
	if err != nil {
		return p, fmt.Errorf("package [%d, %d): num_hashes truncated", start, end)
	}
	if nh > maxHashes {
		return p, fmt.Errorf("package [%d, %d): %d proof hashes, at most %d", start, end, nh, maxHashes)
	}
	for range nh {
		h := make([]byte, 32)
		if _, err := io.ReadFull(r, h); err != nil {
			return p, fmt.Errorf("package [%d, %d): proof truncated", start, end)
		}
		p.proof = append(p.proof, h)
	}
	return p, nil
}

// AddEntriesBody writes an add-entries body for [start, end) of origin;
// entries(from, to) returns those entries and proof(at) the consistency
// proof from tree size at to end. It writes at most maxPackages packages.
func AddEntriesBody(origin string, start, end uint64, entries func(from, to uint64) ([][]byte, error), proof func(at uint64) ([][]byte, error)) ([]byte, error) {
	var b bytes.Buffer
	_ = binary.Write(&b, binary.BigEndian, uint16(len(origin)))
	b.WriteString(origin)
	_ = binary.Write(&b, binary.BigEndian, start)
	_ = binary.Write(&b, binary.BigEndian, end)
	_ = binary.Write(&b, binary.BigEndian, uint16(0))
	for i := range min(numPackages(start, end), maxPackages) {
		if b.Len() > maxMirrorBody/2 {
			break // the rest in the next request, well within the mirror's limit
		}
		s, e := packageBounds(start, end, i)
		es, err := entries(s, e)
		if err != nil {
			return nil, err
		}
		if len(es) != int(e-s) {
			return nil, fmt.Errorf("entries [%d, %d): got %d", s, e, len(es))
		}
		for _, x := range es {
			if len(x) > 0xffff {
				return nil, fmt.Errorf("entry of %d bytes: the mirror protocol carries at most 65535", len(x))
			}
			_ = binary.Write(&b, binary.BigEndian, uint16(len(x)))
			b.Write(x)
		}
		p, err := proof(e)
		if err != nil {
			return nil, err
		}
		b.WriteByte(byte(len(p)))
		for _, h := range p {
			b.Write(h)
		}
	}
	return b.Bytes(), nil
}

// MirrorInfo is the text/x.tlog.mirror-info body of a 409 or 202: a
// pending checkpoint size the mirror accepts as upload_end, and the next
// entry it needs.
type MirrorInfo struct {
	Pending, Next uint64
}

func (m MirrorInfo) body() []byte { return fmt.Appendf(nil, "%d\n%d\n\n", m.Pending, m.Next) }

// ParseMirrorInfo reads a mirror-info body.
func ParseMirrorInfo(b []byte) (MirrorInfo, error) {
	lines := strings.Split(string(b), "\n")
	if len(lines) != 4 || lines[3] != "" {
		return MirrorInfo{}, errors.New("mirror-info: want three lines")
	}
	p, err1 := strconv.ParseUint(lines[0], 10, 64)
	n, err2 := strconv.ParseUint(lines[1], 10, 64)
	if err1 != nil || err2 != nil {
		return MirrorInfo{}, fmt.Errorf("mirror-info: sizes %q %q", clip([]byte(lines[0])), clip([]byte(lines[1])))
	}
	return MirrorInfo{Pending: p, Next: n}, nil
}
