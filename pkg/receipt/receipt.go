// Package receipt is the signed record of one request: its model and
// canonical (deterministic) encoding, its RFC 6962 leaf hash, the compact
// token returned in x-knhk-receipt, and the delegation certificate by which
// a KMS key vouches for the short-lived key that signs receipts inline.
// The Merkle log, checkpoints and proofs build on these (issue 5).
package receipt

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"time"
)

// Receipt records one request. No value is refused for its size: a string
// field longer than 8 KiB is recorded as its length and SHA-256 (see
// Digested), so a client cannot send a request too big to be receipted.
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
	// Digested holds the string fields recorded as length + SHA-256. Decode
	// fills it and leaves those strings empty; Encode digests any string
	// over the limit itself, so issuers just set the strings.
	Digested Digests
}

// Digests are the digested string fields of a receipt; the zero
// FieldDigest means the field is recorded inline.
type Digests struct {
	Method, Authority, Path, Version, Class, Decision, Caller, Region FieldDigest
}

// FieldDigest stands for a string too long to record inline.
type FieldDigest struct {
	Len    uint64
	SHA256 [32]byte
}

// Matches reports whether v is the value d was made from.
func (d FieldDigest) Matches(v string) bool {
	return d.Len == uint64(len(v)) && d.SHA256 == sha256.Sum256([]byte(v))
}

func (d FieldDigest) isZero() bool { return d == FieldDigest{} }

const (
	encodingVersion = 1
	// maxInline is the longest string recorded as itself. Version 1
	// receipts had it as a hard limit, so lengths above it were never
	// valid before: digests took that range, and every earlier receipt
	// keeps its bytes and its leaf hash.
	maxInline = 8 << 10
)

// stringField names a string field of Receipt and its digest, in encoding
// order; one table drives Encode, Decode and View.
type stringField struct {
	name   string
	value  func(*Receipt) *string
	digest func(*Receipt) *FieldDigest
}

var (
	// headFields come before status and duration, tailFields after.
	headFields = []stringField{
		{"method", func(r *Receipt) *string { return &r.Method }, func(r *Receipt) *FieldDigest { return &r.Digested.Method }},
		{"authority", func(r *Receipt) *string { return &r.Authority }, func(r *Receipt) *FieldDigest { return &r.Digested.Authority }},
		{"path", func(r *Receipt) *string { return &r.Path }, func(r *Receipt) *FieldDigest { return &r.Digested.Path }},
	}
	tailFields = []stringField{
		{"version", func(r *Receipt) *string { return &r.Version }, func(r *Receipt) *FieldDigest { return &r.Digested.Version }},
		{"class", func(r *Receipt) *string { return &r.Class }, func(r *Receipt) *FieldDigest { return &r.Digested.Class }},
		{"decision", func(r *Receipt) *string { return &r.Decision }, func(r *Receipt) *FieldDigest { return &r.Digested.Decision }},
		{"caller", func(r *Receipt) *string { return &r.Caller }, func(r *Receipt) *FieldDigest { return &r.Digested.Caller }},
		{"region", func(r *Receipt) *string { return &r.Region }, func(r *Receipt) *FieldDigest { return &r.Digested.Region }},
	}
)

// ErrMalformed wraps every decoding error.
var ErrMalformed = errors.New("malformed receipt")

// Encode returns the canonical bytes: a version byte, then every field in
// a fixed order — integers big-endian, digests as 32 raw bytes, strings as
// a uvarint length and then, up to 8 KiB, the bytes themselves, or above
// that their SHA-256. The length alone decides the form, so equal receipts
// encode to equal bytes. The only errors are a receipt whose Digested
// contradicts its strings.
func (r *Receipt) Encode() ([]byte, error) {
	b := make([]byte, 0, 256)
	b = append(b, encodingVersion)
	b = append(b, r.ID[:]...)
	b = binary.BigEndian.AppendUint64(b, uint64(r.Time))
	var err error
	if b, err = r.appendStrings(b, headFields); err != nil {
		return nil, err
	}
	b = binary.BigEndian.AppendUint16(b, r.Status)
	b = binary.BigEndian.AppendUint64(b, r.DurationUs)
	if b, err = r.appendStrings(b, tailFields); err != nil {
		return nil, err
	}
	for _, d := range [][32]byte{r.ReqHeaders, r.ResHeaders, r.ReqBody, r.ResBody} {
		b = append(b, d[:]...)
	}
	return b, nil
}

func (r *Receipt) appendStrings(b []byte, fields []stringField) ([]byte, error) {
	for _, f := range fields {
		v, d := *f.value(r), *f.digest(r)
		switch {
		case d.isZero() && len(v) <= maxInline:
			b = binary.AppendUvarint(b, uint64(len(v)))
			b = append(b, v...)
		case d.isZero():
			b = appendDigest(b, FieldDigest{Len: uint64(len(v)), SHA256: sha256.Sum256([]byte(v))})
		case v != "":
			return nil, fmt.Errorf("receipt %s: both a value and a digest", f.name)
		case d.Len <= maxInline:
			return nil, fmt.Errorf("receipt %s: a digest of %d bytes; only values over %d bytes are digested", f.name, d.Len, maxInline)
		default:
			b = appendDigest(b, d)
		}
	}
	return b, nil
}

func appendDigest(b []byte, d FieldDigest) []byte {
	b = binary.AppendUvarint(b, d.Len)
	return append(b, d.SHA256[:]...)
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
	d.strings(&r, headFields)
	r.Status = d.u16("status")
	r.DurationUs = d.u64("duration")
	d.strings(&r, tailFields)
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

// View is the receipt as JSON fields (the "decoded" part of a bundle): a
// digested field shows as <name>_len and <name>_sha256 (hex) instead of
// <name>, so a reader sees at once that the value itself is not recorded.
func (r *Receipt) View() map[string]any {
	v := map[string]any{
		"id":                      hex.EncodeToString(r.ID[:]),
		"time":                    time.Unix(0, r.Time).UTC().Format(time.RFC3339Nano),
		"status":                  r.Status,
		"duration_us":             r.DurationUs,
		"request_headers_sha256":  hex.EncodeToString(r.ReqHeaders[:]),
		"response_headers_sha256": hex.EncodeToString(r.ResHeaders[:]),
		"request_body_sha256":     hex.EncodeToString(r.ReqBody[:]),
		"response_body_sha256":    hex.EncodeToString(r.ResBody[:]),
	}
	for _, f := range append(slices.Clone(headFields), tailFields...) {
		s, d := *f.value(r), *f.digest(r)
		if len(s) > maxInline {
			d = FieldDigest{Len: uint64(len(s)), SHA256: sha256.Sum256([]byte(s))}
		}
		if d.isZero() {
			v[f.name] = s
			continue
		}
		v[f.name+"_len"] = d.Len
		v[f.name+"_sha256"] = hex.EncodeToString(d.SHA256[:])
	}
	return v
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

// strings reads fields in order: a length up to maxInline is followed by
// the value, a longer one by the value's SHA-256.
func (d *decoder) strings(r *Receipt, fields []stringField) {
	for _, f := range fields {
		n := d.uvarint(f.name)
		switch {
		case d.err != nil:
			return
		case n <= maxInline:
			*f.value(r) = string(d.need(int(n), f.name))
		default:
			dg := f.digest(r)
			dg.Len = n
			d.fixed(dg.SHA256[:], f.name+" digest")
		}
	}
}

func (d *decoder) uvarint(what string) uint64 {
	if d.err != nil {
		return 0
	}
	n, k := binary.Uvarint(d.b)
	if k <= 0 {
		d.err = fmt.Errorf("%w: bad length of %s", ErrMalformed, what)
		return 0
	}
	// Only the minimal varint is canonical: "\x80\x00" also reads as 0,
	// and two encodings of one receipt would have two leaf hashes.
	if k != len(binary.AppendUvarint(nil, n)) {
		d.err = fmt.Errorf("%w: non-minimal length of %s", ErrMalformed, what)
		return 0
	}
	d.b = d.b[k:]
	return n
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
