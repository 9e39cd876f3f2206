package kms

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	awsconfig "github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials"
	awskms "github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"
)

// AWSConfig names an AWS KMS key.
type AWSConfig struct {
	KeyID    string // key id, ARN or alias
	Region   string
	Endpoint string // optional: a KMS-compatible endpoint (tests: local-kms)
	// Static credentials, for endpoints outside AWS; empty uses none, so
	// production deployments set the SDK's usual environment instead.
	AccessKeyID, SecretAccessKey string
	Timeout                      time.Duration // per call (default 5 s)
	MaxAttempts                  int           // with backoff on throttling (default 5)
}

// AWS signs with an asymmetric AWS KMS key: ECC_NIST_P256 with
// ECDSA_SHA_256 over a SHA-256 digest, or ED25519 with ED25519_SHA_512 over
// the raw message.
type AWS struct {
	client  *awskms.Client
	keyID   string // as configured: an alias follows rotation
	keyARN  string // what it resolved to, and signs with
	alg     Algorithm
	pub     crypto.PublicKey
	timeout time.Duration
}

// OpenAWS connects and reads the key's public half (which also proves the
// key exists and may be used to sign).
func OpenAWS(ctx context.Context, c AWSConfig) (*AWS, error) {
	if c.KeyID == "" {
		return nil, errors.New("aws-kms: key_id is empty")
	}
	if c.Timeout <= 0 {
		c.Timeout = 5 * time.Second
	}
	if c.MaxAttempts <= 0 {
		c.MaxAttempts = 5
	}
	opts := awskms.Options{
		Region: c.Region,
		Retryer: retry.NewStandard(func(o *retry.StandardOptions) {
			o.MaxAttempts = c.MaxAttempts
			o.MaxBackoff = 2 * time.Second
		}),
	}
	if c.Endpoint != "" {
		opts.BaseEndpoint = aws.String(c.Endpoint)
	}
	if c.AccessKeyID != "" {
		opts.Credentials = credentials.NewStaticCredentialsProvider(c.AccessKeyID, c.SecretAccessKey, "")
	} else {
		// The SDK's usual chain: environment, shared files, IMDS, IRSA.
		dc, err := awsconfig.LoadDefaultConfig(ctx, awsconfig.WithRegion(c.Region))
		if err != nil {
			return nil, fmt.Errorf("aws-kms key %s: credentials: %w", c.KeyID, err)
		}
		opts.Credentials = dc.Credentials
	}
	return resolveAWS(ctx, awskms.New(opts), c.KeyID, c.Timeout)
}

// resolveAWS reads the public half of the key keyID names now.
func resolveAWS(ctx context.Context, client *awskms.Client, keyID string, timeout time.Duration) (*AWS, error) {
	c := AWSConfig{KeyID: keyID}
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	out, err := client.GetPublicKey(cctx, &awskms.GetPublicKeyInput{KeyId: aws.String(c.KeyID)})
	if err != nil {
		return nil, fmt.Errorf("aws-kms key %s: get public key: %w", c.KeyID, err)
	}
	a := &AWS{client: client, keyID: keyID, keyARN: aws.ToString(out.KeyId), timeout: timeout}
	if out.KeyUsage != types.KeyUsageTypeSignVerify {
		return nil, fmt.Errorf("aws-kms key %s: usage %s, want SIGN_VERIFY", c.KeyID, out.KeyUsage)
	}
	pub, err := x509.ParsePKIXPublicKey(out.PublicKey)
	if err != nil {
		return nil, fmt.Errorf("aws-kms key %s: public key: %w", c.KeyID, err)
	}
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() {
			return nil, fmt.Errorf("aws-kms key %s: curve %s, want P-256 (ECC_NIST_P256)", c.KeyID, k.Curve.Params().Name)
		}
		a.alg = ECDSAP256SHA256
	case ed25519.PublicKey:
		a.alg = Ed25519
	default:
		return nil, fmt.Errorf("aws-kms key %s: key spec %s is not supported (want ECC_NIST_P256 or ED25519)", c.KeyID, out.KeySpec)
	}
	a.pub = pub
	return a, nil
}

// Sign signs msg; throttling is retried with backoff by the SDK.
func (a *AWS) Sign(ctx context.Context, msg []byte) ([]byte, error) {
	in := &awskms.SignInput{KeyId: aws.String(a.keyARN)}
	if a.alg == ECDSAP256SHA256 {
		d := sha256.Sum256(msg)
		in.Message, in.MessageType, in.SigningAlgorithm = d[:], types.MessageTypeDigest, types.SigningAlgorithmSpecEcdsaSha256
	} else {
		in.Message, in.MessageType, in.SigningAlgorithm = msg, types.MessageTypeRaw, types.SigningAlgorithmSpecEd25519Sha512
	}
	ctx, cancel := context.WithTimeout(ctx, a.timeout)
	defer cancel()
	out, err := a.client.Sign(ctx, in)
	if err != nil {
		return nil, fmt.Errorf("aws-kms key %s: sign: %w", a.keyARN, err)
	}
	return out.Signature, nil
}

// Latest follows an alias to the key it names now. AWS KMS does not
// rotate asymmetric keys in place; rotating one means creating a new key
// and moving the alias (UpdateAlias), which this picks up.
func (a *AWS) Latest(ctx context.Context) (Signer, error) {
	next, err := resolveAWS(ctx, a.client, a.keyID, a.timeout)
	if err != nil {
		return nil, err
	}
	if next.keyARN == a.keyARN {
		return a, nil
	}
	return next, nil
}

// Public returns the key's public half.
func (a *AWS) Public() crypto.PublicKey { return a.pub }

// KeyID is "aws:" and the key ARN.
func (a *AWS) KeyID() string { return "aws:" + a.keyARN }

// Algorithm is the signature scheme.
func (a *AWS) Algorithm() Algorithm { return a.alg }
