package holds

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/knhk/knhk/pkg/receipt"
)

func TestDecodePlaceRefusesBadInput(t *testing.T) {
	now := time.Date(2026, 6, 1, 0, 0, 0, 0, time.UTC)
	id := strings.Repeat("0f", 16)
	for _, c := range []struct{ body, want string }{
		{``, "holds: want a JSON object, got nothing"},
		{`[]`, "holds: want a JSON object"},
		{`{"reason":"r"`, "holds: the body is not a JSON object"},
		{`{"reason":"r"} {}`, "holds: more after the JSON object"},
		{`{"reason":"r","from":"2026-01-01T00:00:00Z","color":"red"}`, `holds: unknown field "color"`},
		{`{"Reason":"r","from":"2026-01-01T00:00:00Z"}`, `holds: unknown field "Reason"`},
		{`{"reason":"r","reason":"s","from":"2026-01-01T00:00:00Z"}`, `holds: "reason": given twice`},
		{`{"reason":"r","from":2026}`, `holds: "from": want a string`},
		{`{"reason":"r","from":null}`, `holds: "from": want a string`},
		{`{"reason":"r","from":{"a":"b"}}`, `holds: "from": want a string`},
		{"{\"reason\":\"\xff\",\"from\":\"2026-01-01T00:00:00Z\"}", "holds: the body is not valid UTF-8"},
		{`{"reason":"r"}`, `holds: give what to hold: "receipt_id", "from" (and "until"), or "caller"`},
		{`{"reason":"r","receipt_id":"` + id + `","caller":"spiffe://a.org/b"}`, `holds: "receipt_id" and "caller": one selector per hold`},
		{`{"reason":"r","until":"2026-01-01T00:00:00Z"}`, `holds: "until": needs "from"`},
		{`{"reason":"r","receipt_id":"abc"}`, `holds: "receipt_id": want 32 hex characters`},
		{`{"reason":"r","receipt_id":"` + strings.Repeat("zz", 16) + `"}`, `holds: "receipt_id": want 32 hex characters`},
		{`{"reason":"r","from":"yesterday"}`, `holds: "from": want an RFC 3339 time such as 2026-01-02T15:04:05Z`},
		{`{"reason":"r","from":"2026-01-02T00:00:00Z","until":"2026-01-01T00:00:00Z"}`, `holds: "until": must be after "from"`},
		{`{"reason":"r","from":"2026-01-02T00:00:00Z","until":"2026-01-02T00:00:00Z"}`, `holds: "until": must be after "from"`},
		{`{"reason":"r","caller":""}`, `holds: "caller": empty`},
		{`{"reason":"r","caller":"alice"}`, `holds: "caller": want a SPIFFE ID (spiffe://trust.domain/path) or the URI SAN`},
		{`{"reason":"r","caller":"spiffe://a.org/b c"}`, `holds: "caller": want a SPIFFE ID`},
		{`{"reason":"r","caller":"spiffe://A_B/c"}`, `holds: "caller": not a SPIFFE ID`},
		{`{"reason":"r","caller":"spiffe://a.org/` + strings.Repeat("x", MaxCaller) + `"}`, `holds: "caller": 2063 bytes, over the 2048-byte limit`},
		{`{"from":"2026-01-01T00:00:00Z"}`, `holds: "reason": required`},
		{`{"reason":"  ","from":"2026-01-01T00:00:00Z"}`, `holds: "reason": required`},
		{`{"reason":"a\nb","from":"2026-01-01T00:00:00Z"}`, `holds: "reason": control characters`},
		{`{"reason":"` + strings.Repeat("é", MaxReason/2+1) + `","from":"2026-01-01T00:00:00Z"}`, `holds: "reason": 1026 bytes, over the 1024-byte limit`},
		{`{"reason":"r","from":"2026-01-01T00:00:00Z","expires":"2026-06-01T00:00:00Z"}`, `holds: "expires": must be in the future`},
		{`{"reason":"r","from":"2026-01-01T00:00:00Z","expires":"soon"}`, `holds: "expires": want an RFC 3339 time`},
		{`{"reason":"` + strings.Repeat("x", MaxBody) + `"}`, "holds: the body is 16397 bytes, over the 16384-byte limit"},
	} {
		_, err := DecodePlace([]byte(c.body), now)
		var ie *InputError
		if err == nil || !errors.As(err, &ie) || !strings.HasPrefix(err.Error(), c.want) {
			t.Errorf("%.80q:\n got  %v\n want %s", c.body, err, c.want)
		}
	}
	for _, ok := range []string{
		`{"receipt_id":"` + strings.ToUpper(id) + `","reason":"r"}`,
		`{"from":"2026-01-01T00:00:00.5+02:00","reason":"r"}`,
		`{"caller":"spiffe://example.org/ns/default/sa/web","reason":"r"}`,
		`{"caller":"urn:example:client-7","reason":"r"}`,
		` { "caller" : "https://id.example.org/svc" , "reason" : "tab\u00e9" , "expires" : "2026-06-01T00:00:01Z" } `,
	} {
		if _, err := DecodePlace([]byte(ok), now); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
}

// canonical is a request as a body DecodePlace takes.
func canonical(r PlaceRequest) []byte {
	f := map[string]string{"reason": r.Reason}
	switch r.Selector.Kind {
	case receipt.HoldReceipt:
		f["receipt_id"] = hex.EncodeToString(r.Selector.ReceiptID[:])
	case receipt.HoldTimeRange:
		f["from"] = formatTime(r.Selector.From)
		if !r.Selector.Until.IsZero() {
			f["until"] = formatTime(r.Selector.Until)
		}
	case receipt.HoldCaller:
		f["caller"] = r.Selector.Caller
	}
	if !r.Expires.IsZero() {
		f["expires"] = formatTime(r.Expires)
	}
	b, _ := json.Marshal(f)
	return b
}

// FuzzDecodePlace: no input panics; whatever is accepted keeps the limits,
// logs as an entry that parses back to it, and reads the same again.
func FuzzDecodePlace(f *testing.F) {
	now := time.Date(2026, 6, 1, 0, 0, 0, 0, time.UTC)
	for _, s := range []string{
		`{"receipt_id":"0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f","reason":"r"}`,
		`{"from":"2026-01-01T00:00:00Z","until":"2026-02-01T00:00:00Z","reason":"case","expires":"2027-01-01T00:00:00Z"}`,
		`{"caller":"spiffe://example.org/a","reason":"x \"y\" \u2028"}`,
		`{"reason":"r","reason":"s"}`, `{"from":1}`, `[`, `{}`, `{"a":"b"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		req, err := DecodePlace(body, now)
		if err != nil {
			var ie *InputError
			if !errors.As(err, &ie) {
				t.Fatalf("not an InputError: %v", err)
			}
			return
		}
		if req.Reason == "" || len(req.Reason) > MaxReason || len(req.Selector.Caller) > MaxCaller || (!req.Expires.IsZero() && !req.Expires.After(now)) {
			t.Fatalf("accepted out of bounds: %+v", req)
		}
		again, err := DecodePlace(canonical(req), now)
		if err != nil || string(canonical(again)) != string(canonical(req)) {
			t.Fatalf("%+v does not read back: %v", req, err)
		}
		h := &Hold{ID: [16]byte{7}, Selector: req.Selector, Reason: req.Reason, Expires: req.Expires, Placed: now}
		r, err := h.entry(ActionPlace).Receipt("", now)
		if err != nil {
			t.Fatalf("%+v: %v", req, err)
		}
		e, ok, err := ParseEntry(&r)
		if !ok || err != nil || e.Reason != req.Reason || e.Selector.Kind != req.Selector.Kind || e.Selector.Caller != req.Selector.Caller ||
			e.Selector.ReceiptID != req.Selector.ReceiptID || !e.Selector.From.Equal(req.Selector.From) || !e.Selector.Until.Equal(req.Selector.Until) ||
			!e.Expires.Equal(req.Expires) {
			t.Fatalf("entry %+v %v %v, want %+v", e, ok, err, req)
		}
	})
}

// FuzzParseEntry: no decision string panics the reader a mirror uses, and
// one that parses re-encodes to itself.
func FuzzParseEntry(f *testing.F) {
	h := &Hold{ID: [16]byte{1}, Selector: Selector{Kind: receipt.HoldCaller, Caller: "spiffe://a.org/b"}, Reason: "r", Placed: time.Unix(0, 0)}
	r, _ := h.entry(ActionLift).Receipt("", time.Now())
	f.Add(r.Decision)
	f.Add("hold/v1 {}")
	f.Add("admitted")
	f.Fuzz(func(t *testing.T, d string) {
		e, ok, err := ParseEntry(&receipt.Receipt{Decision: d})
		if !ok || err != nil {
			return
		}
		again, err := e.decision()
		if err != nil {
			t.Fatal(err)
		}
		e2, _, err := ParseEntry(&receipt.Receipt{Decision: again})
		if err != nil {
			t.Fatal(err)
		}
		if back, _ := e2.decision(); back != again {
			t.Fatalf("%q → %q → %q", d, again, back)
		}
	})
}
