package kms_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	awskms "github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/pkg/kms"
)

// TestAWSKMSAgainstLocalKMS runs the provider against the real local-kms
// emulator: P-256 keys, DIGEST signing, and clear errors for a missing key.
func TestAWSKMSAgainstLocalKMS(t *testing.T) {
	logs := &harness.LogBuffer{}
	lk, err := harness.StartLocalKMS(t.TempDir(), logs)
	if err != nil {
		t.Fatal(err) // never skipped: the error says how to install local-kms
	}
	defer lk.Stop()
	ctx := context.Background()
	admin := awskms.New(awskms.Options{Region: "eu-west-1", BaseEndpoint: aws.String(lk.Endpoint),
		Credentials: credentials.NewStaticCredentialsProvider("x", "y", "")})
	created, err := admin.CreateKey(ctx, &awskms.CreateKeyInput{KeySpec: types.KeySpecEccNistP256, KeyUsage: types.KeyUsageTypeSignVerify})
	if err != nil {
		t.Fatalf("create key in local-kms: %v\n%s", err, logs.String())
	}
	cfg := kms.AWSConfig{KeyID: aws.ToString(created.KeyMetadata.KeyId), Region: "eu-west-1", Endpoint: lk.Endpoint,
		AccessKeyID: "x", SecretAccessKey: "y", MaxAttempts: 2}
	s, err := kms.OpenAWS(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if s.Algorithm() != kms.ECDSAP256SHA256 || !strings.HasPrefix(s.KeyID(), "aws:arn:") {
		t.Fatalf("alg %s, id %s", s.Algorithm(), s.KeyID())
	}
	msg := []byte("checkpoint body")
	sig, err := s.Sign(ctx, msg)
	if err != nil {
		t.Fatal(err)
	}
	if err := kms.Verify(s.Algorithm(), s.Public(), msg, sig); err != nil {
		t.Fatalf("signature from AWS KMS does not verify locally: %v", err)
	}
	if err := kms.Verify(s.Algorithm(), s.Public(), []byte("other"), sig); !errors.Is(err, kms.ErrBadSignature) {
		t.Fatalf("signature verified for another message: %v", err)
	}
	// Rotation: AWS KMS rotates asymmetric keys by moving an alias to a new
	// key. A signer opened on the alias stays pinned until Latest follows it;
	// old signatures keep verifying with the old public key.
	if _, err := admin.CreateAlias(ctx, &awskms.CreateAliasInput{AliasName: aws.String("alias/knhk-receipts"), TargetKeyId: created.KeyMetadata.KeyId}); err != nil {
		t.Fatal(err)
	}
	viaAlias := cfg
	viaAlias.KeyID = "alias/knhk-receipts"
	sa, err := kms.OpenAWS(ctx, viaAlias)
	if err != nil {
		t.Fatal(err)
	}
	if sa.KeyID() != s.KeyID() {
		t.Fatalf("alias resolved to %s, want %s", sa.KeyID(), s.KeyID())
	}
	if same, err := sa.Latest(ctx); err != nil || same != kms.Signer(sa) {
		t.Fatalf("Latest without rotation: %v, %v (want the same signer)", same, err)
	}
	created2, err := admin.CreateKey(ctx, &awskms.CreateKeyInput{KeySpec: types.KeySpecEccNistP256, KeyUsage: types.KeyUsageTypeSignVerify})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.UpdateAlias(ctx, &awskms.UpdateAliasInput{AliasName: aws.String("alias/knhk-receipts"), TargetKeyId: created2.KeyMetadata.KeyId}); err != nil {
		t.Fatal(err)
	}
	s2, err := sa.Latest(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if s2.KeyID() == s.KeyID() || !strings.Contains(s2.KeyID(), aws.ToString(created2.KeyMetadata.KeyId)) {
		t.Fatalf("after UpdateAlias, Latest is %s, want the new key %s", s2.KeyID(), aws.ToString(created2.KeyMetadata.KeyId))
	}
	sig2, err := s2.Sign(ctx, msg)
	if err != nil {
		t.Fatal(err)
	}
	if err := kms.Verify(s2.Algorithm(), s2.Public(), msg, sig2); err != nil {
		t.Fatal(err)
	}
	if err := kms.Verify(s.Algorithm(), s.Public(), msg, sig); err != nil {
		t.Fatal("old signature stopped verifying after rotation")
	}

	cfg.KeyID = "00000000-0000-0000-0000-000000000000"
	_, err = kms.OpenAWS(ctx, cfg)
	if err == nil || !strings.Contains(err.Error(), "aws-kms key 00000000-0000-0000-0000-000000000000") {
		t.Fatalf("missing key: error does not name the provider and key: %v", err)
	}
}
