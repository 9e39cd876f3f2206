// Package receipt is the signed record of one request: its model and
// canonical (deterministic) encoding, its RFC 6962 leaf hash, the compact
// token returned in x-knhk-receipt, and the delegation certificate by which
// a KMS key vouches for the short-lived key that signs receipts inline.
// The Merkle log, checkpoints and proofs build on these (issue 5).
package receipt

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
)

// Receipt records one request.
type Receipt struct {
	ID         [16]byte
	Time       int64 // Unix nanoseconds
	Method     string
	Authority  string
	Path       string
	Status     uint16
	DurationUs uint64
	Version    string // stable | canary | ""
	Class      string // R1 | W1 | C1
	Decision   string // admitted | shed reason
	Caller     string // SPIFFE ID, when known
	Region     string
	ReqHeaders [32]byte // SHA-256 of the canonical request headers
	ResHeaders [32]byte
	ReqBody    [32]byte // zero unless body hashing is on for the route
	ResBody    [32]byte
}

const (
	encodingVersion = 1
	maxField        = 8 << 10 // a longer string is refused, not truncated
)

// ErrMalformed wraps every decoding error.
var ErrMalformed = errors.New("malformed receipt")

// Encode returns the canonical bytes: a version byte, then every field in
// a fixed order — strings length-prefixed (uvarint), integers big-endian,
// digests as 32 raw bytes. Equal receipts encode to equal bytes.
func (r *Receipt) Encode() ([]byte, error) {
	b := make([]byte, 0, 256)
	b = append(b, encodingVersion)
	b = append(b, r.ID[:]...)
	b = binary.BigEndian.AppendUint64(b, uint64(r.Time))
	for _, s := range []struct{ name, v string }{{"method", r.Method}, {"authority", r.Authority}, {"path", r.Path}} {
		if len(s.v) > maxField {
			return nil, fmt.Errorf("receipt %s: %d bytes, over the %d-byte limit", s.name, len(s.v), maxField)
		}
		b = appendString(b, s.v)
	}
	b = binary.BigEndian.AppendUint16(b, r.Status)
	b = binary.BigEndian.AppendUint64(b, r.DurationUs)
	for _, s := range []struct{ name, v string }{{"version", r.Version}, {"class", r.Class}, {"decision", r.Decision}, {"caller", r.Caller}, {"region", r.Region}} {
		if len(s.v) > maxField {
			return nil, fmt.Errorf("receipt %s: %d bytes, over the %d-byte limit", s.name, len(s.v), maxField)
		}
		b = appendString(b, s.v)
	}
	for _, d := range [][32]byte{r.ReqHeaders, r.ResHeaders, r.ReqBody, r.ResBody} {
		b = append(b, d[:]...)
	}
	return b, nil
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// Decode parses canonical bytes; anything else — a wrong version, a
// truncated field, trailing bytes — is ErrMalformed with the reason.
func Decode(b []byte) (Receipt, error) {
	var r Receipt
	d := decoder{b: b}
	if v := d.byte(); d.err == nil && v != encodingVersion {
		return r, fmt.Errorf("%w: encoding version %d, want %d", ErrMalformed, v, encodingVersion)
	}
	d.fixed(r.ID[:], "id")
	r.Time = int64(d.u64("time"))
	r.Method, r.Authority, r.Path = d.str("method"), d.str("authority"), d.str("path")
	r.Status = d.u16("status")
	r.DurationUs = d.u64("duration")
	r.Version, r.Class, r.Decision, r.Caller, r.Region = d.str("version"), d.str("class"), d.str("decision"), d.str("caller"), d.str("region")
	d.fixed(r.ReqHeaders[:], "request headers digest")
	d.fixed(r.ResHeaders[:], "response headers digest")
	d.fixed(r.ReqBody[:], "request body digest")
	d.fixed(r.ResBody[:], "response body digest")
	if d.err != nil {
		return Receipt{}, d.err
	}
	if len(d.b) != 0 {
		return Receipt{}, fmt.Errorf("%w: %d trailing bytes", ErrMalformed, len(d.b))
	}
	return r, nil
}

type decoder struct {
	b   []byte
	err error
}

func (d *decoder) need(n int, what string) []byte {
	if d.err != nil {
		return nil
	}
	if len(d.b) < n {
		d.err = fmt.Errorf("%w: truncated at %s", ErrMalformed, what)
		return nil
	}
	out := d.b[:n]
	d.b = d.b[n:]
	return out
}

func (d *decoder) byte() byte {
	if x := d.need(1, "version"); x != nil {
		return x[0]
	}
	return 0
}

func (d *decoder) fixed(dst []byte, what string) {
	if x := d.need(len(dst), what); x != nil {
		copy(dst, x)
	}
}

func (d *decoder) u64(what string) uint64 {
	if x := d.need(8, what); x != nil {
		return binary.BigEndian.Uint64(x)
	}
	return 0
}

func (d *decoder) u16(what string) uint16 {
	if x := d.need(2, what); x != nil {
		return binary.BigEndian.Uint16(x)
	}
	return 0
}

func (d *decoder) str(what string) string {
	if d.err != nil {
		return ""
	}
	n, k := binary.Uvarint(d.b)
	if k <= 0 {
		d.err = fmt.Errorf("%w: bad length of %s", ErrMalformed, what)
		return ""
	}
	// Only the minimal varint is canonical: "\x80\x00" also reads as 0,
	// and two encodings of one receipt would have two leaf hashes.
	if k != len(binary.AppendUvarint(nil, n)) {
		d.err = fmt.Errorf("%w: non-minimal length of %s", ErrMalformed, what)
		return ""
	}
	if n > maxField {
		d.err = fmt.Errorf("%w: %s is %d bytes, over the %d-byte limit", ErrMalformed, what, n, maxField)
		return ""
	}
	d.b = d.b[k:]
	return string(d.need(int(n), what))
}

// LeafHash is the RFC 6962 leaf hash of the canonical encoding:
// SHA-256(0x00 ‖ bytes).
func LeafHash(encoded []byte) [32]byte {
	h := sha256.New()
	h.Write([]byte{0})
	h.Write(encoded)
	var out [32]byte
	h.Sum(out[:0])
	return out
}
