package server

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/pkg/config"
	"github.com/knhk/knhk/pkg/holds"
	"github.com/knhk/knhk/pkg/receipt"
)

func call(t *testing.T, method, url, body string) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

// bundleOf polls GET /v1/receipts/{tok} until it is in a checkpoint.
func bundleOf(t *testing.T, base, tok string) receipt.Bundle {
	t.Helper()
	var b receipt.Bundle
	err := harness.Poll(20*time.Second, 50*time.Millisecond, func() error {
		code, body := getBody(t, base+"/v1/receipts/"+tok)
		if code != http.StatusOK {
			return fmt.Errorf("%d %s", code, body)
		}
		return json.Unmarshal(body, &b)
	})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// loggedChange reads the hold change a hold receipt logged.
func loggedChange(t *testing.T, base, tok string) holds.Entry {
	t.Helper()
	b := bundleOf(t, base, tok)
	r, err := receipt.Decode(b.Receipt)
	if err != nil {
		t.Fatal(err)
	}
	var view map[string]any
	_ = json.Unmarshal(b.Decoded, &view)
	if d, _ := view["decision"].(string); !strings.HasPrefix(d, "hold/v1 {") {
		t.Fatalf("the bundle's decoded view shows no hold change: %v", view)
	}
	e, ok, err := holds.ParseEntry(&r)
	if !ok || err != nil {
		t.Fatalf("the logged receipt is not a hold change: %v %v (%q)", ok, err, r.Decision)
	}
	return e
}

// TestHoldsThroughTheAdminAPI: holds placed, listed and lifted through
// /v1/holds are each a logged receipt a reader of the log decodes back to
// the change; bad requests get a 4xx naming the field; and a retention
// pass prunes the old bodies no hold keeps, while GET /v1/receipts/{id}
// still proves the pruned ones with the client's token.
func TestHoldsThroughTheAdminAPI(t *testing.T) {
	ctx := context.Background()
	cfg := testConfig(t)
	cfg.Receipts.CheckpointInterval = config.Duration(200 * time.Millisecond)
	cfg.Receipts.Retention.KeepBodiesFor = config.Duration(time.Hour)
	base, _, srv := startServer(t, cfg)
	rs := srv.receipts

	// 300 requests of two hours ago, one after another, so receipt i is
	// entry i: bundle 0 is full, bundle 1 is not.
	old := time.Now().Add(-2 * time.Hour).Truncate(time.Second)
	toks := make([]string, 300)
	ids := make([][16]byte, 300)
	for i := range toks {
		r := receipt.Receipt{Time: old.Add(time.Duration(i) * time.Millisecond).UnixNano(), Method: "GET", Path: fmt.Sprintf("/users/%d", i), Status: 200}
		if i == 10 || i == 11 {
			r.Caller = "spiffe://example.org/ns/legal/sa/subject"
		}
		tok, err := rs.Issue(ctx, &r)
		if err != nil {
			t.Fatal(err)
		}
		toks[i], ids[i] = tok, r.ID
	}
	if b := bundleOf(t, base, toks[299]); b.Index != 299 {
		t.Fatalf("the last receipt is entry %d", b.Index)
	}

	type placed struct {
		Hold  holds.View `json:"hold"`
		Error string     `json:"error"`
	}
	post := func(body string) holds.View {
		t.Helper()
		code, b := call(t, http.MethodPost, base+"/v1/holds", body)
		var p placed
		if err := json.Unmarshal(b, &p); err != nil || code != http.StatusCreated || p.Hold.State != holds.StateActive || p.Hold.Receipt == "" {
			t.Fatalf("POST /v1/holds %s: %d %s", body, code, b)
		}
		return p.Hold
	}
	byID := post(fmt.Sprintf(`{"receipt_id":"%x","reason":"matter 1"}`, ids[3]))
	byCaller := post(`{"caller":"spiffe://example.org/ns/legal/sa/subject","reason":"matter 2","expires":"2999-01-01T00:00:00Z"}`)
	byRange := post(fmt.Sprintf(`{"from":%q,"until":%q,"reason":"matter 3"}`,
		old.Add(20*time.Millisecond).Format(time.RFC3339Nano), old.Add(25*time.Millisecond).Format(time.RFC3339Nano)))
	for _, h := range []holds.View{byID, byCaller, byRange} {
		e := loggedChange(t, base, h.Receipt)
		if e.Action != holds.ActionPlace || fmt.Sprintf("%x", e.ID) != h.ID || e.Reason != h.Reason {
			t.Fatalf("the logged place %+v is not hold %+v", e, h)
		}
	}

	for _, c := range []struct {
		method, path, body string
		code               int
		want               string
	}{
		{"POST", "/v1/holds", `{"from":"2026-02-01T00:00:00Z","until":"2026-01-01T00:00:00Z","reason":"r"}`, 400, `holds: \"until\": must be after \"from\"`},
		{"POST", "/v1/holds", `{"receipt_id":"00","reason":"r"}`, 400, `holds: \"receipt_id\": want 32 hex characters`},
		{"POST", "/v1/holds", `{"caller":"spiffe://example.org/x"}`, 400, `holds: \"reason\": required`},
		{"POST", "/v1/holds", `{"caller":"spiffe://example.org/x","reason":"r","note":"n"}`, 400, `holds: unknown field \"note\"`},
		{"POST", "/v1/holds", `{"caller":"spiffe://example.org/x","reason":"r","expires":"2020-01-01T00:00:00Z"}`, 400, `holds: \"expires\": must be in the future`},
		{"POST", "/v1/holds", `{"reason":"` + strings.Repeat("x", holds.MaxBody) + `"}`, 413, "holds: the body is over the 16384-byte limit"},
		{"DELETE", "/v1/holds/xyz", "", 400, `holds: \"id\": want 32 hex characters`},
		{"DELETE", "/v1/holds/" + strings.Repeat("0", 32), "", 404, "holds: no hold 000"},
	} {
		code, b := call(t, c.method, base+c.path, c.body)
		if code != c.code || !strings.Contains(string(b), c.want) {
			t.Errorf("%s %s %.60s: %d %s, want %d %s", c.method, c.path, c.body, code, b, c.code, c.want)
		}
	}

	code, b := call(t, http.MethodDelete, base+"/v1/holds/"+byRange.ID, "")
	var lifted struct {
		Hold    holds.View `json:"hold"`
		Receipt string     `json:"receipt"`
	}
	if err := json.Unmarshal(b, &lifted); err != nil || code != http.StatusOK || lifted.Receipt == "" {
		t.Fatalf("DELETE /v1/holds/%s: %d %s", byRange.ID, code, b)
	}
	if e := loggedChange(t, base, lifted.Receipt); e.Action != holds.ActionLift || fmt.Sprintf("%x", e.ID) != byRange.ID {
		t.Fatalf("the logged lift %+v is not of hold %s", e, byRange.ID)
	}
	code, b = getBody(t, base+"/v1/holds")
	var list struct {
		Holds []holds.View `json:"holds"`
		Max   int          `json:"max"`
	}
	if err := json.Unmarshal(b, &list); err != nil || code != 200 || len(list.Holds) != 2 || list.Holds[0].ID != byID.ID ||
		list.Holds[1].ID != byCaller.ID || list.Max != holds.MaxHolds {
		t.Fatalf("GET /v1/holds: %d %s", code, b)
	}

	// A retention pass (the background one runs every minute).
	st, err := rs.Prune(ctx, time.Now().Add(-cfg.Receipts.Retention.KeepBodiesFor.D()))
	if err != nil {
		t.Fatal(err)
	}
	if st.Pruned != 256-3 || st.Held != 3 {
		t.Fatalf("pass: %+v, want 253 pruned and 3 held", st)
	}
	var keys receipt.PublishedKeys
	if _, kb := getBody(t, base+"/v1/keys"); json.Unmarshal(kb, &keys) != nil {
		t.Fatalf("keys: %s", kb)
	}
	for i := range 256 {
		b := bundleOf(t, base, toks[i])
		kept := i == 3 || i == 10 || i == 11
		if b.Pruned == kept || (len(b.Receipt) == 0) != b.Pruned {
			t.Fatalf("receipt %d: pruned %v, body of %d bytes; kept by a hold: %v", i, b.Pruned, len(b.Receipt), kept)
		}
		if b.Pruned {
			b.Token = toks[i]
			cs := receipt.Verify(b, keys)
			if last := cs[len(cs)-1]; last.Err != nil || last.Name != "inclusion" || cs[1].Name != "pruned" {
				t.Fatalf("pruned receipt %d: %+v", i, cs)
			}
		}
	}
	if b := bundleOf(t, base, toks[280]); b.Pruned {
		t.Fatal("a receipt in the partial bundle was pruned")
	}
	page := metricsPage(t, base)
	for _, want := range []string{"knhk_receipts_pruned_total 253", "knhk_receipts_held_past_retention 3", "knhk_holds 2", "knhk_holds_unlogged 0"} {
		if !strings.Contains(page, want+"\n") {
			t.Errorf("/metrics lacks %q:\n%s", want, grepLines(page, "knhk_"))
		}
	}
}
