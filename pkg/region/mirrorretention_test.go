package region

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/transparency-dev/tessera"

	"github.com/knhk/knhk/pkg/holds"
	"github.com/knhk/knhk/pkg/receipt"
)

// addEntries appends the given entries to the plain log and returns its
// checkpoint once they are in.
func (l *plainLog) addEntries(entries [][]byte) []byte {
	l.t.Helper()
	ctx := context.Background()
	for _, e := range entries {
		if _, err := l.add(ctx, tessera.NewEntry(e))(); err != nil {
			l.t.Fatal(err)
		}
		l.n++
	}
	return l.grow(0)
}

func encoded(t *testing.T, r receipt.Receipt) []byte {
	t.Helper()
	b, err := r.Encode()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestMirrorAppliesHoldsAndRetention: a mirror reads the origin's hold
// entries as it stores them, and a retention pass replaces the old bodies
// no hold keeps by tombstones with the entry's leaf hash, leaving the
// mirror's tree as it was; a lift lets the held one go at the next pass.
func TestMirrorAppliesHoldsAndRetention(t *testing.T) {
	m := newTestMirror(t)
	old := time.Now().Add(-2 * time.Hour)
	var rs []receipt.Receipt
	var entries [][]byte
	for i := range 5 {
		r := receipt.Receipt{ID: [16]byte{byte(i + 1)}, Time: old.Add(time.Duration(i)).UnixNano(), Method: "GET", Path: "/person", Status: 200}
		rs = append(rs, r)
		entries = append(entries, encoded(t, r))
	}
	young := receipt.Receipt{ID: [16]byte{9}, Time: time.Now().UnixNano(), Method: "GET", Path: "/now", Status: 200}
	entries = append(entries, encoded(t, young))
	place := holds.Entry{Action: holds.ActionPlace, ID: [16]byte{0xaa}, Selector: holds.Selector{Kind: receipt.HoldReceipt, ReceiptID: rs[1].ID}, Reason: "case 7", Placed: old}
	hr, err := place.Receipt("", old.Add(10))
	if err != nil {
		t.Fatal(err)
	}
	entries = append(entries, encoded(t, hr))
	cp := m.l.addEntries(entries)
	if o := m.w.AddCheckpoint(context.Background(), body(0, nil, cp)); o.Status != 200 {
		t.Fatalf("add-checkpoint: %d %s", o.Status, o.Body)
	}
	if o := m.AddEntries(context.Background(), bytes.NewReader(m.upload(t, 0, m.l.n, nil))); o.Status != 200 {
		t.Fatalf("add-entries: %d %s", o.Status, o.Body)
	}
	before, _ := m.Logs()
	st, err := m.Prune(time.Now().Add(-time.Hour), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	// 0, 2, 3 and 4 are old and unheld; 1 is held; the pass stops at the
	// young one (receipts are in time order, near enough), so the hold
	// entry after it waits for it.
	if st.Pruned != 4 || st.Held != 1 {
		t.Fatalf("pass: %+v, want 4 pruned and 1 held", st)
	}
	for i, want := range []bool{true, false, true, true, true, false, false} {
		e, _ := m.Entry(testOrigin, uint64(i))
		_, leaf, pruned := receipt.ParseTombstone(e)
		if pruned != want {
			t.Fatalf("entry %d pruned %v, want %v", i, pruned, want)
		}
		if pruned && !bytes.Equal(leaf[:], leafOf(entries[i])) {
			t.Fatalf("entry %d's tombstone has leaf %x, want the entry's", i, leaf)
		}
	}
	after, _ := m.Logs()
	if !bytes.Equal(before[0].Root, after[0].Root) || before[0].Size != after[0].Size {
		t.Fatalf("pruning moved the mirror's tree: %+v → %+v", before, after)
	}
	if st, err := m.Prune(time.Now().Add(-time.Hour), time.Now()); err != nil || st.Pruned != 0 {
		t.Fatalf("a second pass: %+v %v", st, err)
	}
	// The hold is lifted in the origin's log: the next pass lets entry 1 go.
	lift := place
	lift.Action = holds.ActionLift
	lr, err := lift.Receipt("", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	from := m.l.n
	cp = m.l.addEntries([][]byte{encoded(t, lr)})
	if o := m.w.AddCheckpoint(context.Background(), body(from, m.l.consistency(from, m.l.n), cp)); o.Status != 200 {
		t.Fatalf("add-checkpoint: %d %s", o.Status, o.Body)
	}
	if o := m.AddEntries(context.Background(), bytes.NewReader(m.upload(t, from, m.l.n, nil))); o.Status != 200 {
		t.Fatalf("add-entries: %d %s", o.Status, o.Body)
	}
	if st, err := m.Prune(time.Now().Add(-time.Hour), time.Now()); err != nil || st.Pruned != 1 || st.Held != 0 {
		t.Fatalf("after the lift: %+v %v", st, err)
	}
}
