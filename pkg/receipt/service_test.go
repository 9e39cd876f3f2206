package receipt

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"log/slog"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"
	vault "github.com/hashicorp/vault/api"

	"github.com/knhk/knhk/internal/azkvtest"
	"github.com/knhk/knhk/internal/vaulttest"
	"github.com/knhk/knhk/pkg/kms"
)

func openTestService(t *testing.T, dir string, signer kms.Signer) *Service {
	t.Helper()
	s, err := OpenService(context.Background(), dir, ServiceConfig{Origin: "test/log", Region: "r", Instance: "i",
		Delegation: time.Hour, CheckpointInterval: 100 * time.Millisecond, BatchMaxAge: time.Millisecond}, signer, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// localTestService opens a service on a local key in a fresh directory.
func localTestService(t *testing.T) (string, kms.Signer, *Service) {
	t.Helper()
	dir := t.TempDir()
	signer, err := kms.OpenLocal(filepath.Join(dir, "kms.key"))
	if err != nil {
		t.Fatal(err)
	}
	return dir, signer, openTestService(t, dir, signer)
}

// bundleWhenIntegrated polls until the receipt is in a signed checkpoint.
func bundleWhenIntegrated(t *testing.T, s *Service, id [16]byte) Bundle {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, err := s.Bundle(context.Background(), id)
		if err == nil {
			return b
		}
		if !errors.Is(err, ErrNotIntegrated) || time.Now().After(deadline) {
			t.Fatalf("bundle: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func mustVerify(t *testing.T, what string, b Bundle, k PublishedKeys) {
	t.Helper()
	checks := Verify(b, k)
	if last := checks[len(checks)-1]; last.Err != nil || last.Name != "inclusion" {
		t.Fatalf("%s: check %s failed: %v", what, last.Name, last.Err)
	}
}

func issueOne(t *testing.T, s *Service) (string, Token) {
	t.Helper()
	r := Receipt{Time: time.Now().UnixNano(), Method: "GET", Path: "/", Status: 200}
	tokStr, err := s.Issue(context.Background(), &r)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := ParseToken(tokStr)
	if err != nil {
		t.Fatal(err)
	}
	return tokStr, tok
}

// rotatable is a KMS key whose versions rotate in the KMS.
type rotatable interface {
	kms.Signer
	kms.Versioned
}

// vaultKey and azureKey open a fresh key in the in-repo Vault Transit and
// Key Vault servers, through the real vault/api and azkeys clients, and
// return it with a function that rotates it through the admin API.
func vaultKey(t *testing.T) (rotatable, func(context.Context) error) {
	srv := httptest.NewServer(vaulttest.New("root"))
	t.Cleanup(srv.Close)
	admin, err := vault.NewClient(&vault.Config{Address: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	admin.SetToken("root")
	if _, err := admin.Logical().Write("transit/keys/receipts", map[string]any{"type": "ecdsa-p256"}); err != nil {
		t.Fatal(err)
	}
	v, err := kms.OpenVault(context.Background(), kms.VaultConfig{Address: srv.URL, Token: "root", Key: "receipts"})
	if err != nil {
		t.Fatal(err)
	}
	return v, func(ctx context.Context) error {
		_, err := admin.Logical().WriteWithContext(ctx, "transit/keys/receipts/rotate", nil)
		return err
	}
}

type fixedToken struct{}

func (fixedToken) GetToken(context.Context, policy.TokenRequestOptions) (azcore.AccessToken, error) {
	return azcore.AccessToken{Token: "t", ExpiresOn: time.Now().Add(time.Hour)}, nil
}

func azureKey(t *testing.T) (rotatable, func(context.Context) error) {
	srv := httptest.NewTLSServer(azkvtest.New("t"))
	t.Cleanup(srv.Close)
	opts := &azkeys.ClientOptions{DisableChallengeResourceVerification: true}
	opts.Transport = srv.Client()
	admin, err := azkeys.NewClient(srv.URL+"/", fixedToken{}, opts)
	if err != nil {
		t.Fatal(err)
	}
	kty, crv := azkeys.KeyTypeEC, azkeys.CurveNameP256
	if _, err := admin.CreateKey(context.Background(), "receipts", azkeys.CreateKeyParameters{Kty: &kty, Curve: &crv}, nil); err != nil {
		t.Fatal(err)
	}
	a, err := kms.OpenAzure(context.Background(), kms.AzureConfig{VaultURL: srv.URL + "/", Key: "receipts", Credential: fixedToken{},
		HTTPClient: srv.Client(), DisableChallengeResourceVerification: true})
	if err != nil {
		t.Fatal(err)
	}
	return a, func(ctx context.Context) error {
		_, err := admin.RotateKey(ctx, "receipts", nil)
		return err
	}
}

// TestKMSKeyRotationAtRuntime rotates the KMS key (Vault Transit, Azure Key
// Vault) under a running service: the new version is published next to the
// old one, certifies the next delegated key and signs the next
// checkpoints, and receipts from before the rotation keep verifying — also
// after a restart. (AWS: e2e TestKMSKeyRotationAtRuntime with local-kms.)
func TestKMSKeyRotationAtRuntime(t *testing.T) {
	for name, open := range map[string]func(*testing.T) (rotatable, func(context.Context) error){"vault": vaultKey, "azure": azureKey} {
		t.Run(name, func(t *testing.T) {
			key, rotate := open(t)
			rotateUnderService(t, key, rotate)
		})
	}
}

func rotateUnderService(t *testing.T, v rotatable, rotate func(context.Context) error) {
	ctx := context.Background()
	dir := t.TempDir()
	s := openTestService(t, dir, v)
	_, before := issueOne(t, s)
	if changed, err := s.RefreshKMS(ctx); err != nil || changed {
		t.Fatalf("refresh without rotation: changed %v, %v", changed, err)
	}
	if err := rotate(ctx); err != nil {
		t.Fatal(err)
	}
	if changed, err := s.RefreshKMS(ctx); err != nil || !changed {
		t.Fatalf("refresh after rotation: changed %v, %v", changed, err)
	}
	_, after := issueOne(t, s)
	if before.KeyID == after.KeyID {
		t.Fatal("the delegated key was not re-certified by the new KMS key version")
	}
	bAfter := bundleWhenIntegrated(t, s, after.ID)
	keys, err := s.Published()
	if err != nil {
		t.Fatal(err)
	}
	if len(keys.KMS) != 2 || len(keys.LogVerifierKeys) != 2 {
		t.Fatalf("published %d KMS keys and %d verifier keys, want both versions", len(keys.KMS), len(keys.LogVerifierKeys))
	}
	latest, err := v.Latest(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := keys.KMS[latest.KeyID()]; !ok || latest.KeyID() == v.KeyID() {
		t.Fatalf("the new version %s is not published: %v", latest.KeyID(), keys.KMS)
	}
	bBefore := bundleWhenIntegrated(t, s, before.ID)
	mustVerify(t, "receipt from before the rotation", bBefore, keys)
	mustVerify(t, "receipt from after the rotation", bAfter, keys)
	// Only the old verifier key: the new checkpoint must not verify.
	old := keys
	old.LogVerifierKey, old.LogVerifierKeys = keys.LogVerifierKeys[0], keys.LogVerifierKeys[:1]
	if checks := Verify(bAfter, old); checks[len(checks)-1].Name != "checkpoint" {
		t.Fatalf("a checkpoint signed after rotation verified with the old key only: %v", checks[len(checks)-1])
	}

	// Restart on the new version: history and tokens come back from disk.
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	nv, err := v.Latest(ctx)
	if err != nil {
		t.Fatal(err)
	}
	s = openTestService(t, dir, nv)
	defer func() { _ = s.Close(ctx) }()
	keys, _ = s.Published()
	b := bundleWhenIntegrated(t, s, before.ID)
	if b.Token == "" {
		t.Fatal("bundle after restart has no token: the index lost the inline signature")
	}
	mustVerify(t, "pre-rotation receipt after restart", b, keys)
}

// TestIndexRebuiltAfterLoss: with the index file gone (or behind the log
// after a crash), a restart indexes the log again; bundles are found and
// verify with the token the client holds.
func TestIndexRebuiltAfterLoss(t *testing.T) {
	ctx := context.Background()
	dir, signer, s := localTestService(t)
	tokStr, tok := issueOne(t, s)
	bundleWhenIntegrated(t, s, tok.ID)
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(dir, "index.db")); err != nil {
		t.Fatal(err)
	}
	s = openTestService(t, dir, signer)
	defer func() { _ = s.Close(ctx) }()
	b := bundleWhenIntegrated(t, s, tok.ID)
	if b.Token != "" {
		t.Fatalf("a rebuilt index invented a token %q", b.Token)
	}
	b.Token = tokStr
	keys, _ := s.Published()
	mustVerify(t, "receipt found by a rebuilt index", b, keys)
}

// TestJournalRecoveryAfterCrash: receipts journaled (their tokens given
// out) but not in the log when the process died are appended at the next
// start, from kr1 records (a journal left by the version before batches)
// and from sealed batches, and their bundles carry the tokens clients got; one already in the log is not appended twice; a torn last record
// (its sync never returned, so no token went out) is ignored.
func TestJournalRecoveryAfterCrash(t *testing.T) {
	ctx := context.Background()
	dir, signer, s := localTestService(t)
	_, inLog := issueOne(t, s)
	bundleWhenIntegrated(t, s, inLog.ID)
	d := s.keys.Current()
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	// What a crash leaves: a segment with the receipt already in the log,
	// two that never reached it, and a torn record.
	var seg []byte
	var lost []Token
	add := func(r *Receipt) Token {
		enc, err := r.Encode()
		if err != nil {
			t.Fatal(err)
		}
		tok := signKR1(r.ID, LeafHash(enc), d.KeyID, d.Key)
		p := kr1Record(tok, enc)
		seg = binary.BigEndian.AppendUint32(seg, uint32(len(p)))
		seg = binary.BigEndian.AppendUint32(seg, crc32.Checksum(p, crcTable))
		seg = append(seg, p...)
		return tok
	}
	s = openTestService(t, dir, signer)
	b, err := s.Bundle(ctx, inLog.ID)
	if err != nil {
		t.Fatal(err)
	}
	before, _ := Decode(b.Receipt)
	_ = s.Close(ctx)
	add(&before)
	for i := range 2 {
		r := Receipt{Time: time.Now().UnixNano(), Method: "POST", Path: "/lost", Status: uint16(200 + i)}
		_, _ = rand.Read(r.ID[:])
		lost = append(lost, add(&r))
	}
	// And a sealed batch of three, as this version journals them.
	var encs [][]byte
	var batch []Receipt
	for i := range 3 {
		r := Receipt{Time: time.Now().UnixNano(), Method: "PUT", Path: "/lost-batch", Status: uint16(200 + i)}
		_, _ = rand.Read(r.ID[:])
		enc, _ := r.Encode()
		encs, batch = append(encs, enc), append(batch, r)
	}
	leaves := make([][32]byte, len(encs))
	for i, e := range encs {
		leaves[i] = LeafHash(e)
	}
	seal, paths := sealBatch(99, leaves, d.KeyID, d.Key)
	p := appendBatchRecord(nil, &seal, encs)
	seg = binary.BigEndian.AppendUint32(seg, uint32(len(p)))
	seg = binary.BigEndian.AppendUint32(seg, crc32.Checksum(p, crcTable))
	seg = append(seg, p...)
	for i, r := range batch {
		lost = append(lost, batchToken(r.ID, leaves[i], &seal, i, paths[i]))
	}
	seg = append(seg, 0, 0, 1, 0, 1, 2) // torn: a header with no payload
	if err := os.WriteFile(filepath.Join(dir, "journal", segmentName(7)), seg, 0o600); err != nil {
		t.Fatal(err)
	}

	s = openTestService(t, dir, signer)
	defer func() { _ = s.Close(ctx) }()
	keys, _ := s.Published()
	for _, tok := range lost {
		b := bundleWhenIntegrated(t, s, tok.ID)
		if b.Token != tok.String() {
			t.Fatalf("recovered receipt's bundle has token %q, want the one the client got", b.Token)
		}
		mustVerify(t, "recovered receipt", b, keys)
	}
	cp, _, err := s.rlog.Checkpoint(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if cp.Size != 6 {
		t.Fatalf("log has %d entries, want 6: the receipt already in the log was appended again, or a lost one was not", cp.Size)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "journal", "wal-0000000000000007.log")); len(left) != 0 {
		t.Fatal("the recovered segment was not removed")
	}
}

// TestOversizedReceiptIssuedAndVerified: a request with a 9 KiB path and a
// 60 KiB authority gets a receipt (a token within the header budget), the
// receipt goes through the journal and the log, its bundle verifies, and
// the bundle's decoded view shows both fields as length + SHA-256.
func TestOversizedReceiptIssuedAndVerified(t *testing.T) {
	ctx := context.Background()
	_, _, s := localTestService(t)
	defer func() { _ = s.Close(ctx) }()
	path := "/" + strings.Repeat("p", 9<<10)
	authority := strings.Repeat("a", 60<<10)
	r := Receipt{Time: time.Now().UnixNano(), Method: "GET", Authority: authority, Path: path, Status: 200}
	tokStr, err := s.Issue(ctx, &r)
	if err != nil {
		t.Fatalf("a receipt with a long path was refused: %v", err)
	}
	if len(tokStr) > 512 {
		t.Fatalf("token is %d bytes, over 512", len(tokStr))
	}
	tok, err := ParseToken(tokStr)
	if err != nil {
		t.Fatal(err)
	}
	b := bundleWhenIntegrated(t, s, tok.ID)
	keys, err := s.Published()
	if err != nil {
		t.Fatal(err)
	}
	mustVerify(t, "receipt with digested fields", b, keys)
	var view map[string]any
	if err := json.Unmarshal(b.Decoded, &view); err != nil {
		t.Fatal(err)
	}
	ps, as := sha256.Sum256([]byte(path)), sha256.Sum256([]byte(authority))
	if view["path_len"] != float64(len(path)) || view["path_sha256"] != hex.EncodeToString(ps[:]) ||
		view["authority_len"] != float64(len(authority)) || view["authority_sha256"] != hex.EncodeToString(as[:]) {
		t.Fatalf("decoded view does not show the digests: %s", b.Decoded)
	}
	if _, ok := view["path"]; ok {
		t.Fatal("decoded view has a path for a digested field")
	}
	// A view that lies about the receipt fails verification.
	lie := b
	lie.Decoded = []byte(strings.Replace(string(b.Decoded), hex.EncodeToString(ps[:]), hex.EncodeToString(as[:]), 1))
	if checks := Verify(lie, keys); checks[len(checks)-1].Err == nil {
		t.Fatal("a bundle whose decoded view differs from its receipt verified")
	}
}

// TestNotIntegratedSaysWhenToRetry: a fresh receipt's bundle is missing
// with the time until a checkpoint covers it — about one checkpoint
// interval, not a fixed second — and the receipt is covered by then.
func TestNotIntegratedSaysWhenToRetry(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	signer, err := kms.OpenLocal(filepath.Join(dir, "kms.key"))
	if err != nil {
		t.Fatal(err)
	}
	const interval, batch = 2 * time.Second, 10 * time.Millisecond
	s, err := OpenService(ctx, dir, ServiceConfig{Origin: "test/log", Region: "r", Instance: "i", Delegation: time.Hour,
		CheckpointInterval: interval, BatchMaxAge: batch}, signer, discard())
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = s.Close(ctx) }()
	_, tok := issueOne(t, s)
	start := time.Now()
	_, err = s.Bundle(ctx, tok.ID)
	var ni *NotIntegratedError
	if !errors.As(err, &ni) || !errors.Is(err, ErrNotIntegrated) {
		t.Fatalf("fresh receipt: %v, want a NotIntegratedError", err)
	}
	if ni.CheckpointInterval != interval || ni.RetryAfter < interval/2 || ni.RetryAfter > interval+batch {
		t.Fatalf("retry after %s, interval %s; want about %s", ni.RetryAfter, ni.CheckpointInterval, interval)
	}
	// Covered by then (a wide margin for a loaded machine).
	deadline := start.Add(ni.RetryAfter + 3*time.Second)
	for {
		if _, err := s.Bundle(ctx, tok.ID); err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("not in a checkpoint %s after a retry-after of %s: %v", time.Since(start), ni.RetryAfter, err)
		}
		time.Sleep(20 * time.Millisecond) // poll period
	}
}

// TestIssueHonoursItsDeadlineWhenTheJournalStalls: a journal sync that
// does not return in time gives the caller an error by its deadline (so
// ext_proc can refuse before Envoy gives up), and the record, once it
// lands, is still logged. Issue once waited on the journal whatever the
// context said.
func TestIssueHonoursItsDeadlineWhenTheJournalStalls(t *testing.T) {
	_, _, s := localTestService(t)
	s.wal.mu.Lock() // the committer blocks in its next write, as on a stalled disk
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	r := Receipt{Time: 1, Method: "GET", Path: "/stalled", Status: 200}
	start := time.Now()
	tok, err := s.Issue(ctx, &r)
	waited := time.Since(start)
	s.wal.mu.Unlock()
	if err == nil || tok != "" {
		t.Fatalf("a stalled journal gave token %q, err %v", tok, err)
	}
	if waited > 5*time.Second {
		t.Fatalf("Issue waited %v past its 100 ms deadline", waited)
	}
	b := bundleWhenIntegrated(t, s, r.ID) // logged all the same
	if got, err := Decode(b.Receipt); err != nil || got.Path != "/stalled" {
		t.Fatalf("logged %+v (%v)", got, err)
	}
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// TestCommitWaitSharesOneSignature: receipts issued together within
// commit_wait share a journal sync and batch signatures, 128 receipts at
// most to a signature (so 300 make several batches in one sync), and each
// token verifies (through its bundle) with its own audit path.
func TestCommitWaitSharesOneSignature(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	signer, err := kms.OpenLocal(filepath.Join(dir, "kms.key"))
	if err != nil {
		t.Fatal(err)
	}
	// A wait far longer than the goroutines take to start, however loaded
	// the machine; a batch is full at maxBatch anyway.
	s, err := OpenService(ctx, dir, ServiceConfig{Origin: "test/log", Region: "r", Instance: "i", Delegation: time.Hour,
		CheckpointInterval: 100 * time.Millisecond, BatchMaxAge: time.Millisecond, CommitWait: 2 * time.Second}, signer, discard())
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = s.Close(ctx) }()
	const n = 300
	toks := make([]Token, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			r := Receipt{Time: time.Now().UnixNano(), Method: "GET", Path: fmt.Sprint("/", i), Status: 200}
			raw, err := s.Issue(ctx, &r)
			if err == nil {
				toks[i], err = ParseToken(raw)
			}
			if err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	keys, _ := s.Published()
	type leafAt struct {
		batch uint64
		leaf  int
	}
	seen := map[leafAt]bool{}
	sizes := map[uint64]int{}
	for _, tok := range toks {
		at := leafAt{tok.BatchID, tok.LeafIndex}
		if !tok.Batched || tok.BatchSize > maxBatch || seen[at] {
			t.Fatalf("token in batch %d (size %d, leaf %d): not batched, over %d, or a leaf given twice", tok.BatchID, tok.BatchSize, tok.LeafIndex, maxBatch)
		}
		seen[at] = true
		sizes[tok.BatchID] = tok.BatchSize
		b := bundleWhenIntegrated(t, s, tok.ID)
		if b.Token != tok.String() {
			t.Fatalf("bundle token %q, want the one issued", b.Token)
		}
		mustVerify(t, "batched receipt", b, keys)
	}
	total := 0
	for _, size := range sizes {
		total += size
	}
	if total != n || len(sizes) < 3 {
		t.Fatalf("batches %v: %d receipts in %d batches, want %d in at least 3", sizes, total, len(sizes), n)
	}
	if len(sizes) > 10 {
		t.Errorf("%d batches for %d receipts issued together: commit_wait did not group them", len(sizes), n)
	}
}

// TestBatchIDsStayUniqueAcrossRestarts: a receipt from before a restart
// and one after each keep their own batch, so both bundles carry the
// tokens their clients got.
func TestBatchIDsStayUniqueAcrossRestarts(t *testing.T) {
	ctx := context.Background()
	dir, signer, s := localTestService(t)
	before, tokBefore := issueOne(t, s)
	bundleWhenIntegrated(t, s, tokBefore.ID)
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	s = openTestService(t, dir, signer)
	defer func() { _ = s.Close(ctx) }()
	after, tokAfter := issueOne(t, s)
	if tokAfter.BatchID == tokBefore.BatchID {
		t.Fatalf("batch id %d used before and after the restart", tokAfter.BatchID)
	}
	for want, id := range map[string][16]byte{before: tokBefore.ID, after: tokAfter.ID} {
		if b := bundleWhenIntegrated(t, s, id); b.Token != want {
			t.Fatalf("bundle token %q, want %q", b.Token, want)
		}
	}
}

// TestOneSyncManyBatches: a group larger than a batch (300 receipts queued
// behind one sync) is cut into signed batches of at most 128, one journal
// write, and each receipt's acknowledgement carries its own batch's seal
// and path.
func TestOneSyncManyBatches(t *testing.T) {
	w, _, err := openWAL(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	pub, priv, _ := ed25519.GenerateKey(nil)
	const n = 300
	leaves := make([][32]byte, n)
	acks := make([]<-chan walAck, n)
	for i := range n { // queued before the committer runs: one group
		leaves[i] = LeafHash([]byte(fmt.Sprint(i)))
		if acks[i], err = w.submit(context.Background(), []byte(fmt.Sprint(i)), leaves[i]); err != nil {
			t.Fatal(err)
		}
	}
	var sealed []*batchSeal
	if err := w.start(func() ([8]byte, ed25519.PrivateKey) { return [8]byte{1}, priv }, func(b *batchSeal) { sealed = append(sealed, b) }, 0); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = w.close(context.Background()) }()
	for i, ack := range acks {
		a := w.await(ack)
		if a.err != nil {
			t.Fatal(a.err)
		}
		tok := batchToken([16]byte{}, leaves[i], a.seal, a.index, a.path)
		if !tok.VerifySignature(pub) {
			t.Fatalf("receipt %d (leaf %d of batch %d, size %d) does not verify", i, a.index, a.seal.ID, len(a.seal.Leaves))
		}
	}
	if len(sealed) != 3 || len(sealed[0].Leaves) != maxBatch || len(sealed[2].Leaves) != n-2*maxBatch {
		t.Fatalf("%d batches sealed, want 3 of 128, 128 and 44", len(sealed))
	}
}
