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
	// A second key (the "rotated" KMS key): old signatures still verify
	// with the old public key, new ones with the new.
	created2, err := admin.CreateKey(ctx, &awskms.CreateKeyInput{KeySpec: types.KeySpecEccNistP256, KeyUsage: types.KeyUsageTypeSignVerify})
	if err != nil {
		t.Fatal(err)
	}
	cfg2 := cfg
	cfg2.KeyID = aws.ToString(created2.KeyMetadata.KeyId)
	s2, err := kms.OpenAWS(ctx, cfg2)
	if err != nil {
		t.Fatal(err)
	}
	if s2.KeyID() == s.KeyID() {
		t.Fatal("two keys, one id")
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
