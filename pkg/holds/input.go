package holds

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"slices"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/knhk/knhk/pkg/receipt"
)

// Limits on what a hold may be.
const (
	MaxBody   = 16 << 10 // a POST /v1/holds body
	MaxReason = 1 << 10  // bytes of "reason"
	MaxCaller = 2 << 10  // bytes of "caller" (the SPIFFE ID limit)
	MaxHolds  = 10_000   // holds in place at once
)

// InputError is a request knhk refuses, with the JSON field it is about.
type InputError struct{ Msg string }

func (e *InputError) Error() string { return "holds: " + e.Msg }

func bad(format string, args ...any) error { return &InputError{fmt.Sprintf(format, args...)} }

// Selector is what a hold keeps: one receipt (by id), the receipts of a
// time range (by their Time: From ≤ Time < Until; a zero Until has no end),
// or the receipts of one caller.
type Selector struct {
	Kind        receipt.HoldKind
	ReceiptID   [16]byte
	From, Until time.Time
	Caller      string
}

// hold is the selector as retention applies it.
func (s Selector) hold(expires time.Time) receipt.Hold {
	return receipt.Hold{Kind: s.Kind, ReceiptID: s.ReceiptID, From: s.From, Until: s.Until, Caller: s.Caller, Expires: expires}
}

// kind names the selector in logs (never its value: a caller identity is
// personal data).
func (s Selector) kind() string {
	switch s.Kind {
	case receipt.HoldReceipt:
		return "receipt_id"
	case receipt.HoldTimeRange:
		return "time_range"
	}
	return "caller"
}

// PlaceRequest is the body of POST /v1/holds.
type PlaceRequest struct {
	Selector Selector
	Reason   string
	Expires  time.Time // zero: until lifted
}

// placeFields are the names POST /v1/holds takes.
var placeFields = []string{"receipt_id", "from", "until", "caller", "reason", "expires"}

// DecodePlace reads a POST /v1/holds body strictly: one JSON object of
// string values, with no unknown, repeated or differently cased names; one
// selector ("receipt_id", "from" with an optional "until", or "caller"); a
// "reason"; and an optional "expires" after now.
func DecodePlace(body []byte, now time.Time) (PlaceRequest, error) {
	if len(body) > MaxBody {
		return PlaceRequest{}, bad("the body is %d bytes, over the %d-byte limit", len(body), MaxBody)
	}
	f, err := decodeObject(body, placeFields)
	if err != nil {
		return PlaceRequest{}, err
	}
	var req PlaceRequest
	if req.Selector, err = parseSelector(f); err != nil {
		return PlaceRequest{}, err
	}
	if req.Reason, err = parseReason(f); err != nil {
		return PlaceRequest{}, err
	}
	if v, ok := f["expires"]; ok {
		if req.Expires, err = parseTime("expires", v); err != nil {
			return PlaceRequest{}, err
		}
		if !req.Expires.After(now) {
			return PlaceRequest{}, bad(`"expires": must be in the future`)
		}
	}
	return req, nil
}

// decodeObject reads exactly one flat JSON object whose values are all
// strings. encoding/json alone would take the last of two equal names, match
// names without regard to case and replace invalid UTF-8 silently.
func decodeObject(data []byte, allowed []string) (map[string]string, error) {
	if !utf8.Valid(data) {
		return nil, bad("the body is not valid UTF-8")
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	syntax := func(err error) error {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return bad("the body is not a JSON object: %v", err)
	}
	tok, err := dec.Token()
	if errors.Is(err, io.EOF) {
		return nil, bad("want a JSON object, got nothing")
	}
	if err != nil {
		return nil, syntax(err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, bad("want a JSON object")
	}
	out := map[string]string{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, syntax(err)
		}
		name, _ := tok.(string)
		switch {
		case !slices.Contains(allowed, name):
			return nil, bad("unknown field %q (want %s)", name, quoteAll(allowed))
		case hasKey(out, name):
			return nil, bad("%q: given twice", name)
		}
		if tok, err = dec.Token(); err != nil {
			return nil, syntax(err)
		}
		v, ok := tok.(string)
		if !ok {
			return nil, bad("%q: want a string", name)
		}
		out[name] = v
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return nil, syntax(err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, bad("more after the JSON object")
	}
	return out, nil
}

func hasKey(m map[string]string, k string) bool {
	_, ok := m[k]
	return ok
}

func quoteAll(names []string) string {
	q := make([]string, len(names))
	for i, n := range names {
		q[i] = fmt.Sprintf("%q", n)
	}
	return strings.Join(q, ", ")
}

// parseSelector reads the one selector of a request or an entry.
func parseSelector(f map[string]string) (Selector, error) {
	var given []string
	for _, k := range []string{"receipt_id", "from", "caller"} {
		if hasKey(f, k) {
			given = append(given, k)
		}
	}
	switch {
	case hasKey(f, "until") && !hasKey(f, "from"):
		return Selector{}, bad(`"until": needs "from"`)
	case len(given) == 0:
		return Selector{}, bad(`give what to hold: "receipt_id", "from" (and "until"), or "caller"`)
	case len(given) > 1:
		return Selector{}, bad("%q and %q: one selector per hold (place one hold for each)", given[0], given[1])
	}
	var s Selector
	var err error
	switch given[0] {
	case "receipt_id":
		s.Kind = receipt.HoldReceipt
		if s.ReceiptID, err = parseID("receipt_id", f["receipt_id"]); err != nil {
			return Selector{}, err
		}
	case "from":
		s.Kind = receipt.HoldTimeRange
		if s.From, err = parseTime("from", f["from"]); err != nil {
			return Selector{}, err
		}
		if v, ok := f["until"]; ok {
			if s.Until, err = parseTime("until", v); err != nil {
				return Selector{}, err
			}
			if !s.Until.After(s.From) {
				return Selector{}, bad(`"until": must be after "from"`)
			}
		}
	case "caller":
		s.Kind = receipt.HoldCaller
		s.Caller = f["caller"]
		if err := checkCaller(s.Caller); err != nil {
			return Selector{}, err
		}
	}
	return s, nil
}

// parseID reads a receipt or hold id: 32 hex characters.
func parseID(field, v string) ([16]byte, error) {
	var id [16]byte
	b, err := hex.DecodeString(v)
	if err != nil || len(b) != len(id) {
		return id, bad("%q: want 32 hex characters", field)
	}
	copy(id[:], b)
	return id, nil
}

// ParseID reads a hold id (DELETE /v1/holds/{id}).
func ParseID(v string) ([16]byte, error) { return parseID("id", v) }

func parseTime(field, v string) (time.Time, error) {
	t, err := time.Parse(time.RFC3339Nano, v)
	if err != nil {
		return time.Time{}, bad("%q: want an RFC 3339 time such as 2026-01-02T15:04:05Z", field)
	}
	return t.UTC(), nil
}

func formatTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339Nano)
}

func parseReason(f map[string]string) (string, error) {
	v, ok := f["reason"]
	switch {
	case !ok || strings.TrimSpace(v) == "":
		return "", bad(`"reason": required (why the receipts are held)`)
	case len(v) > MaxReason:
		return "", bad(`"reason": %d bytes, over the %d-byte limit`, len(v), MaxReason)
	case strings.ContainsFunc(v, unicode.IsControl):
		return "", bad(`"reason": control characters (newlines, tabs) are not allowed`)
	}
	return v, nil
}

// checkCaller accepts what knhk records as a receipt's caller: the
// downstream peer's URI SAN under mTLS, a SPIFFE ID in a mesh.
func checkCaller(v string) error {
	const want = `"caller": want a SPIFFE ID (spiffe://trust.domain/path) or the URI SAN knhk records as a receipt's caller`
	switch {
	case v == "":
		return bad(`"caller": empty`)
	case len(v) > MaxCaller:
		return bad(`"caller": %d bytes, over the %d-byte limit`, len(v), MaxCaller)
	case strings.ContainsFunc(v, func(r rune) bool { return r <= ' ' || r >= 0x7f || r == '"' || r == '\\' }):
		return bad("%s; it holds characters a URI does not", want)
	}
	if strings.HasPrefix(strings.ToLower(v), "spiffe:") {
		if _, err := spiffeid.FromString(v); err != nil {
			return bad(`"caller": not a SPIFFE ID: %v`, err)
		}
		return nil
	}
	if u, err := url.Parse(v); err != nil || !u.IsAbs() {
		return bad("%s", want)
	}
	return nil
}
