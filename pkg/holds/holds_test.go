package holds

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/knhk/knhk/pkg/receipt"
)

// fakeLog is the receipt service as holds see it: it keeps what was
// issued and the last hold set, and fails while fail is set.
type fakeLog struct {
	mu     sync.Mutex
	fail   error
	issued []receipt.Receipt
	set    *receipt.HoldSet
}

func (f *fakeLog) Issue(_ context.Context, r *receipt.Receipt) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail != nil {
		return "", f.fail
	}
	_, _ = rand.Read(r.ID[:])
	enc, err := r.Encode()
	if err != nil {
		return "", err
	}
	dec, err := receipt.Decode(enc) // as a mirror reads it from the log
	if err != nil {
		return "", err
	}
	f.issued = append(f.issued, dec)
	return "tok-" + hex.EncodeToString(r.ID[:]), nil
}

func (f *fakeLog) SetHolds(s *receipt.HoldSet) {
	f.mu.Lock()
	f.set = s
	f.mu.Unlock()
}

func (f *fakeLog) setFail(err error) {
	f.mu.Lock()
	f.fail = err
	f.mu.Unlock()
}

// entries are the hold changes logged so far, parsed back from the log.
func (f *fakeLog) entries(t *testing.T) []Entry {
	t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []Entry
	for _, r := range f.issued {
		e, ok, err := ParseEntry(&r)
		if !ok || err != nil {
			t.Fatalf("a logged hold change does not parse: %v (%q)", err, r.Decision)
		}
		out = append(out, e)
	}
	return out
}

func (f *fakeLog) holds(r receipt.Receipt, now time.Time) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.set != nil && f.set.Holds(&r, now)
}

func open(t *testing.T, path string, lg Log, o Options) *Manager {
	t.Helper()
	m, err := Open(path, lg, slog.New(slog.DiscardHandler), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close() })
	return m
}

func place(t *testing.T, body string) PlaceRequest {
	t.Helper()
	req, err := DecodePlace([]byte(body), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return req
}

func poll(t *testing.T, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v", what, err)
		}
		time.Sleep(10 * time.Millisecond) // poll period
	}
}

// TestPlaceListLift: each change is logged as an entry a reader of the log
// decodes back to the hold; retention is handed every hold, and the
// holds' own place entries; a lift is logged, then no longer holds; holds
// survive a restart.
func TestPlaceListLift(t *testing.T) {
	ctx := context.Background()
	lg := &fakeLog{}
	path := filepath.Join(t.TempDir(), "holds.db")
	m := open(t, path, lg, Options{})
	id := strings.Repeat("ab", 16)
	byID, err := m.Place(ctx, place(t, `{"receipt_id":"`+strings.ToUpper(id)+`","reason":"case 1","expires":"2999-01-01T00:00:00Z"}`), "spiffe://example.org/admin")
	if err != nil {
		t.Fatal(err)
	}
	byRange, err := m.Place(ctx, place(t, `{"from":"2026-01-01T00:00:00Z","until":"2026-02-01T00:00:00+01:00","reason":"case 2"}`), "")
	if err != nil {
		t.Fatal(err)
	}
	byCaller, err := m.Place(ctx, place(t, `{"caller":"spiffe://example.org/ns/a/sa/b","reason":"case 3 — ünïcode \"quoted\" <b>"}`), "")
	if err != nil {
		t.Fatal(err)
	}
	if byID.ReceiptID != id || byID.State != StateActive || !strings.HasPrefix(byID.Receipt, "tok-") || byRange.Until != "2026-01-31T23:00:00Z" {
		t.Fatalf("views: %+v %+v", byID, byRange)
	}
	list := m.List()
	if len(list) != 3 || m.Count() != 3 || m.Unlogged() != 0 || list[0].ID != byID.ID || list[2].ID != byCaller.ID {
		t.Fatalf("list: %+v", list)
	}
	es := lg.entries(t)
	if len(es) != 3 || es[0].Action != ActionPlace || hex.EncodeToString(es[0].ID[:]) != byID.ID ||
		hex.EncodeToString(es[0].Selector.ReceiptID[:]) != id || es[0].Reason != "case 1" || !es[0].Expires.Equal(time.Date(2999, 1, 1, 0, 0, 0, 0, time.UTC)) {
		t.Fatalf("logged place: %+v", es)
	}
	if es[1].Selector.Kind != receipt.HoldTimeRange || !es[1].Selector.Until.Equal(time.Date(2026, 1, 31, 23, 0, 0, 0, time.UTC)) ||
		es[2].Selector.Caller != "spiffe://example.org/ns/a/sa/b" || es[2].Reason != `case 3 — ünïcode "quoted" <b>` {
		t.Fatalf("logged places: %+v", es)
	}
	lg.mu.Lock()
	first := lg.issued[0]
	lg.mu.Unlock()
	if first.Method != "POST" || first.Path != "/v1/holds" || first.Status != 201 || first.Caller != "spiffe://example.org/admin" {
		t.Fatalf("the place receipt: %+v", first)
	}
	now := time.Now()
	var rid [16]byte
	copy(rid[:], mustHex(t, id))
	for name, c := range map[string]struct {
		r    receipt.Receipt
		want bool
	}{
		"by id":                {receipt.Receipt{ID: rid}, true},
		"in range":             {receipt.Receipt{Time: time.Date(2026, 1, 15, 0, 0, 0, 0, time.UTC).UnixNano()}, true},
		"after range":          {receipt.Receipt{Time: time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC).UnixNano()}, false},
		"by caller":            {receipt.Receipt{Caller: "spiffe://example.org/ns/a/sa/b"}, true},
		"another caller":       {receipt.Receipt{Caller: "spiffe://example.org/ns/a/sa/c"}, false},
		"the hold's own entry": {first, true},
	} {
		if got := lg.holds(c.r, now); got != c.want {
			t.Errorf("%s: held %v, want %v", name, got, c.want)
		}
	}

	// Restart: the same holds.
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	lg2 := &fakeLog{}
	m = open(t, path, lg2, Options{})
	if got := m.List(); fmt.Sprint(got) != fmt.Sprint(list) {
		t.Fatalf("after a restart:\n%+v\nwant\n%+v", got, list)
	}
	if !lg2.holds(receipt.Receipt{ID: rid}, now) {
		t.Fatal("Open did not hand retention the holds")
	}
	v, tok, err := m.Lift(ctx, mustID(t, byID.ID), "spiffe://example.org/admin2")
	if err != nil || !strings.HasPrefix(tok, "tok-") || v.LiftedBy != "spiffe://example.org/admin2" {
		t.Fatalf("lift: %+v %q %v", v, tok, err)
	}
	es = lg2.entries(t)
	if len(es) != 1 || es[0].Action != ActionLift || hex.EncodeToString(es[0].ID[:]) != byID.ID || es[0].Reason != "case 1" {
		t.Fatalf("logged lift: %+v", es)
	}
	if lg2.holds(receipt.Receipt{ID: rid}, now) || lg2.holds(first, now) || m.Count() != 2 {
		t.Fatal("a lifted hold still holds")
	}
	if _, _, err := m.Lift(ctx, mustID(t, byID.ID), ""); !errors.Is(err, ErrNotFound) {
		t.Fatalf("lifting twice: %v", err)
	}
}

func mustHex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func mustID(t *testing.T, s string) [16]byte {
	t.Helper()
	id, err := ParseID(s)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// TestChangesThatCannotBeLoggedStayInForce: while the log refuses, a new
// hold is in force (unlogged) and a lifted one stays in force (lifting);
// both are logged once the log takes them again, the place of a hold
// before its lift, and a restart logs what a crash left unlogged.
func TestChangesThatCannotBeLoggedStayInForce(t *testing.T) {
	ctx := context.Background()
	lg := &fakeLog{}
	path := filepath.Join(t.TempDir(), "holds.db")
	m := open(t, path, lg, Options{RetryEvery: 10 * time.Millisecond})
	lg.setFail(errors.New("journal failed"))
	v, err := m.Place(ctx, place(t, `{"caller":"spiffe://example.org/x","reason":"r"}`), "")
	if !errors.Is(err, ErrNotLogged) || v.State != StateUnlogged || v.ID == "" {
		t.Fatalf("place while the log fails: %+v %v", v, err)
	}
	held := receipt.Receipt{Caller: "spiffe://example.org/x"}
	if !lg.holds(held, time.Now()) || m.Unlogged() != 1 {
		t.Fatal("an unlogged hold is not in force")
	}
	// A lift of a hold whose place is not logged yet is kept, and logged
	// (after the place) once the log takes them: never forgotten.
	if _, _, err := m.Lift(ctx, mustID(t, v.ID), ""); !errors.Is(err, ErrNotLogged) {
		t.Fatalf("lift while the log fails: %v", err)
	}
	if l := m.List(); len(l) != 1 || l[0].State != StateLifting || !lg.holds(held, time.Now()) {
		t.Fatalf("after a failed lift: %+v", l)
	}
	lg.setFail(nil)
	poll(t, "the place and the lift logged by a retry", func() error {
		if l := m.List(); len(l) != 0 {
			return fmt.Errorf("%+v", l)
		}
		return nil
	})
	if lg.holds(held, time.Now()) {
		t.Fatal("the lifted hold still holds")
	}
	first := v.ID
	// A logged hold whose lift cannot be logged yet stays in force.
	if v, err = m.Place(ctx, place(t, `{"caller":"spiffe://example.org/x","reason":"r"}`), ""); err != nil {
		t.Fatal(err)
	}
	lg.setFail(errors.New("journal failed"))
	if v, _, err = m.Lift(ctx, mustID(t, v.ID), ""); !errors.Is(err, ErrNotLogged) || v.State != StateLifting {
		t.Fatalf("lift while the log fails: %+v %v", v, err)
	}
	if !lg.holds(held, time.Now()) {
		t.Fatal("a lift not yet logged took the hold away")
	}
	// Placed, unlogged, and then a crash: the next start logs it.
	v2, err := m.Place(ctx, place(t, `{"from":"2026-01-01T00:00:00Z","reason":"r2"}`), "")
	if !errors.Is(err, ErrNotLogged) {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	lg.setFail(nil)
	m = open(t, path, lg, Options{RetryEvery: time.Hour}) // only the retry at start
	poll(t, "the changes logged at start", func() error {
		if l := m.List(); len(l) != 1 || l[0].ID != v2.ID || l[0].State != StateActive {
			return fmt.Errorf("%+v", l)
		}
		return nil
	})
	if lg.holds(held, time.Now()) {
		t.Fatal("the lifted hold still holds")
	}
	var actions []string
	for _, e := range lg.entries(t) {
		actions = append(actions, e.Action+":"+hex.EncodeToString(e.ID[:]))
	}
	want := []string{"place:" + first, "lift:" + first, "place:" + v.ID, "lift:" + v.ID, "place:" + v2.ID}
	if fmt.Sprint(actions) != fmt.Sprint(want) {
		t.Fatalf("logged %v, want %v", actions, want)
	}
}

func TestTooManyHolds(t *testing.T) {
	ctx := context.Background()
	m := open(t, filepath.Join(t.TempDir(), "holds.db"), &fakeLog{}, Options{Max: 2})
	for range 2 {
		if _, err := m.Place(ctx, place(t, `{"from":"2026-01-01T00:00:00Z","reason":"r"}`), ""); err != nil {
			t.Fatal(err)
		}
	}
	_, err := m.Place(ctx, place(t, `{"from":"2026-01-01T00:00:00Z","reason":"r"}`), "")
	if !errors.Is(err, ErrTooMany) || !strings.Contains(err.Error(), "2 are in place, the most knhk keeps; lift one first") || m.Count() != 2 {
		t.Fatalf("a third hold: %v", err)
	}
}

// TestExpiredHoldsGo: a hold past its expiry no longer holds, and is
// dropped without an entry (its place entry says when it expires).
func TestExpiredHoldsGo(t *testing.T) {
	ctx := context.Background()
	var mu sync.Mutex
	now := time.Now()
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	lg := &fakeLog{}
	m := open(t, filepath.Join(t.TempDir(), "holds.db"), lg, Options{RetryEvery: 10 * time.Millisecond, Now: clock})
	exp := now.Add(time.Hour).UTC().Format(time.RFC3339)
	if _, err := m.Place(ctx, place(t, `{"caller":"spiffe://example.org/x","reason":"r","expires":"`+exp+`"}`), ""); err != nil {
		t.Fatal(err)
	}
	held := receipt.Receipt{Caller: "spiffe://example.org/x"}
	if !lg.holds(held, now) || lg.holds(held, now.Add(2*time.Hour)) {
		t.Fatal("the hold set does not apply the expiry")
	}
	mu.Lock()
	now = now.Add(2 * time.Hour)
	mu.Unlock()
	poll(t, "the expired hold dropped", func() error {
		if n := m.Count(); n != 0 {
			return fmt.Errorf("%d holds", n)
		}
		return nil
	})
	if len(lg.entries(t)) != 1 {
		t.Fatal("an expiry was logged")
	}
}

// TestEntriesStayInline: the longest hold there can be still logs as a
// decodable entry (a receipt field over 8 KiB would be only a digest).
func TestEntriesStayInline(t *testing.T) {
	caller := "spiffe://example.org/" + strings.Repeat("a", MaxCaller-len("spiffe://example.org/"))
	reason := strings.Repeat("\u2028", MaxReason/3) + strings.Repeat(`"`, MaxReason%3)
	body := fmt.Sprintf(`{"caller":%q,"reason":%q,"expires":"2999-12-31T23:59:59.999999999Z"}`, caller, reason)
	req, err := DecodePlace([]byte(body), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	h := &Hold{Selector: req.Selector, Reason: req.Reason, Expires: req.Expires, Placed: time.Now(), ID: [16]byte{1}}
	for _, a := range []string{ActionPlace, ActionLift} {
		r, err := h.entry(a).Receipt(caller, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		enc, _ := r.Encode()
		dec, _ := receipt.Decode(enc)
		e, ok, err := ParseEntry(&dec)
		if !ok || err != nil || e.Reason != reason || e.Selector.Caller != caller || e.Action != a {
			t.Fatalf("%s: %v %v (decision %d bytes)", a, ok, err, len(r.Decision))
		}
	}
}
