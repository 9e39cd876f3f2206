package holds

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/knhk/knhk/pkg/receipt"
)

// A hold change is logged as a receipt, like the requests it is about, so
// it is in the tamper-evident log and a mirror reading the log's entries
// can apply it. The receipt records the admin request (method, path,
// status, the admin's caller identity) and carries the change in its
// Decision field:
//
//	hold/v1 {"action":"place","id":"<32 hex>","receipt_id":"<32 hex>","reason":"…","expires":"…","placed":"…"}
//
// One JSON object, names in this order, the selector as in POST /v1/holds
// ("receipt_id"; "from" and "until"; or "caller"), times in RFC 3339 UTC,
// "expires" absent for a hold until lifted. A lift repeats the hold it
// lifts with "action":"lift". knhk sets a request receipt's Decision
// itself ("admitted", "shed:…", "refused:…"), never from the request, so a
// client cannot forge a hold entry. The whole field stays under the 8 KiB
// a receipt records inline.
const entryPrefix = "hold/v1 "

// Actions of a hold change.
const (
	ActionPlace = "place"
	ActionLift  = "lift"
)

// Entry is a hold change as logged.
type Entry struct {
	Action   string
	ID       [16]byte
	Selector Selector
	Reason   string
	Expires  time.Time
	Placed   time.Time
}

// entryDoc is Entry's JSON, in its field order.
type entryDoc struct {
	Action    string `json:"action"`
	ID        string `json:"id"`
	ReceiptID string `json:"receipt_id,omitempty"`
	From      string `json:"from,omitempty"`
	Until     string `json:"until,omitempty"`
	Caller    string `json:"caller,omitempty"`
	Reason    string `json:"reason"`
	Expires   string `json:"expires,omitempty"`
	Placed    string `json:"placed"`
}

var entryFields = []string{"action", "id", "receipt_id", "from", "until", "caller", "reason", "expires", "placed"}

// maxInline is what a receipt records of a string as itself (longer ones
// only as a digest, which no mirror could read).
const maxInline = 8 << 10

func (e Entry) decision() (string, error) {
	d := entryDoc{Action: e.Action, ID: hex.EncodeToString(e.ID[:]), Reason: e.Reason, Expires: formatTime(e.Expires), Placed: formatTime(e.Placed)}
	switch e.Selector.Kind {
	case receipt.HoldReceipt:
		d.ReceiptID = hex.EncodeToString(e.Selector.ReceiptID[:])
	case receipt.HoldTimeRange:
		d.From, d.Until = formatTime(e.Selector.From), formatTime(e.Selector.Until)
	case receipt.HoldCaller:
		d.Caller = e.Selector.Caller
	}
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(d); err != nil {
		return "", err
	}
	s := entryPrefix + strings.TrimSuffix(b.String(), "\n")
	if len(s) > maxInline {
		return "", fmt.Errorf("hold %x: its log entry would be %d bytes, over the %d a receipt records inline", e.ID, len(s), maxInline)
	}
	return s, nil
}

// Receipt is the receipt that logs the change, made by the admin request
// of caller by (the hold id in the path of a lift).
func (e Entry) Receipt(by string, now time.Time) (receipt.Receipt, error) {
	d, err := e.decision()
	if err != nil {
		return receipt.Receipt{}, err
	}
	r := receipt.Receipt{Time: now.UnixNano(), Method: http.MethodPost, Path: "/v1/holds", Status: http.StatusCreated, Caller: by, Decision: d}
	if e.Action == ActionLift {
		r.Method, r.Path, r.Status = http.MethodDelete, "/v1/holds/"+hex.EncodeToString(e.ID[:]), http.StatusOK
	}
	return r, nil
}

// ParseEntry reads a hold change from a receipt of the log; ok is false
// for a receipt that is not one. A mirror applies the changes in log
// order: a place adds the hold (a second place of the same id changes
// nothing: knhk logs a change again when it cannot tell whether its first
// entry made it), a lift removes it (a lift of an id it does not hold
// changes nothing), and a hold past "expires" no longer holds, without an
// entry.
func ParseEntry(r *receipt.Receipt) (e Entry, ok bool, err error) {
	doc, found := strings.CutPrefix(r.Decision, entryPrefix)
	if !found {
		return Entry{}, false, nil
	}
	f, err := decodeObject([]byte(doc), entryFields)
	if err != nil {
		return Entry{}, true, err
	}
	switch e.Action = f["action"]; e.Action {
	case ActionPlace, ActionLift:
	default:
		return Entry{}, true, bad(`"action": want "place" or "lift"`)
	}
	if e.ID, err = parseID("id", f["id"]); err != nil {
		return Entry{}, true, err
	}
	if e.Selector, err = parseSelector(f); err != nil {
		return Entry{}, true, err
	}
	if e.Reason, err = parseReason(f); err != nil {
		return Entry{}, true, err
	}
	if v, ok := f["expires"]; ok {
		if e.Expires, err = parseTime("expires", v); err != nil {
			return Entry{}, true, err
		}
	}
	if e.Placed, err = parseTime("placed", f["placed"]); err != nil {
		return Entry{}, true, err
	}
	return e, true, nil
}

// Hold is the hold the entry places, as retention applies it.
func (e Entry) Hold() receipt.Hold { return e.Selector.hold(e.Expires) }
