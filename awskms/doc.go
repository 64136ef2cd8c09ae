// Package awskms is a [kleidi.Provider] whose root of trust is AWS KMS: each key-encryption key (KEK) is
// encrypted under a KMS key that never leaves AWS KMS, so a copy of the disk, the keyring or an etcd backup is
// useless without the right to call kms:Decrypt on that key. It is a Go module of its own, so that programs that
// import kleidi, kleidi/tpm or kleidi/gpg never download the AWS SDK.
//
//	p, err := awskms.New(ctx, awskms.Config{
//		KeyID:        "alias/kleidi",         // symmetric, ENCRYPT_DECRYPT
//		SigningKeyID: "alias/kleidi-proofs",  // ECC_NIST_P256, SIGN_VERIFY
//		Region:       "eu-west-1",
//	})
//
// # Keys
//
// A provider uses two KMS keys, named by key ID, key ARN, alias name or alias ARN:
//
//   - [Config.KeyID], a symmetric encryption key (key spec SYMMETRIC_DEFAULT, key usage ENCRYPT_DECRYPT), wraps
//     KEKs. Wrap calls kms:Encrypt with the encryption context {"kleidi": "kek-v1"} plus the pairs of
//     [Config.EncryptionContext]; AWS KMS decrypts only under the same context, so a blob made for another
//     purpose, by another program or for another cluster never unwraps here. Unwrap calls kms:Decrypt without
//     naming the key, so that AWS KMS reads the key from the blob and authenticates all of it, and accepts the
//     answer only if the key that decrypted is the provider's (its ARN, learned at the first call).
//   - [Config.SigningKeyID], an asymmetric signing key (ECC_NIST_P256 or ECC_NIST_P384, SIGN_VERIFY), makes the
//     proofs of [kleidi.Authenticator]. See "Proofs".
//
// Create them once per cluster (or per region), for instance:
//
//	aws kms create-key --description "kleidi KEKs"     # then: aws kms create-alias --alias-name alias/kleidi ...
//	aws kms create-key --description "kleidi proofs" --key-spec ECC_NIST_P256 --key-usage SIGN_VERIFY
//
// # Permissions
//
// The plugin's principal needs, on the encryption key, kms:Encrypt (Wrap, and once per process to learn the
// key's ARN and make the health probe) and kms:Decrypt (Unwrap, Health); on the signing key, kms:Sign (Prove:
// once per wrapped KEK, at init and at each rotation) and kms:GetPublicKey (once per process, for Verify). No
// other principal should have kms:Sign on the signing key. A key policy can pin the context with the condition
// key kms:EncryptionContext:kleidi.
//
// Credentials come from the AWS SDK's default chain: environment variables, the shared configuration and
// credentials files (AWS_PROFILE), web identity (IRSA on EKS: AWS_ROLE_ARN and AWS_WEB_IDENTITY_TOKEN_FILE), EKS
// Pod Identity, ECS task roles, then EC2 instance roles. The region is [Config.Region], else AWS_REGION or the
// shared configuration; [Config.Endpoint] selects a FIPS or VPC endpoint, or a compatible server such as
// local-kms.
//
// # Proofs
//
// kms:Encrypt needs no secret: whoever may call it on the encryption key makes blobs that Unwrap accepts, and
// key policies often grant it widely (any role of the account, a service that encrypts for others), since
// encrypting reveals nothing. Such a party, if it can also write etcd, could attach a KEK of its choice to a
// ciphertext. A proof stops it: [Provider.Prove] has AWS KMS sign (kms:Sign, ECDSA over the SHA-256 or SHA-384
// digest of a fixed label and the message) with the signing key, which never leaves AWS KMS, and
// [Provider.Verify] checks the signature locally with the public key, fetched once per process
// (kms:GetPublicKey): about 0.1 ms, and never a call to AWS KMS after the first, so a flood of forged attached
// keys costs nothing but CPU. A node that lost its keyring verifies the proofs in its ciphertexts with the same
// signing key. What the proof protects is the Envelope's acceptance of a KEK that arrives from outside: only a
// principal with kms:Sign on the signing key can make one acceptable. It does not restrict kms:Decrypt: whoever may
// decrypt with the encryption key may unwrap every KEK, as with any KMS.
//
// # Errors and retries
//
// A call that AWS KMS throttles, that fails on AWS's side, or that cannot reach AWS KMS is retried with
// exponential backoff and jitter, up to [Config.MaxAttempts] tries within [Config.Timeout] and the caller's
// context; then it fails with an error wrapping [kleidi.ErrUnavailable]. A refusal fails at once: Unwrap and
// Health wrap [kleidi.ErrUnwrap] with [ErrInvalidCiphertext] (altered, another key, another context),
// [ErrAccessDenied], [ErrKeyDisabled], [ErrKeyState] (pending deletion), [ErrKeyNotFound] or [ErrKeyUsage], and
// the message names the key and the permission. When AWS KMS answers only "access denied" to a Decrypt, a second
// Decrypt that names the key learns whether it is disabled or pending deletion. Health decrypts a probe made at
// the first call: one kms:Decrypt per call.
//
// Never re-point the key's alias to another key: the KEKs wrapped under the old key would no longer unwrap (the
// provider accepts only what the key it resolved at start decrypts). Use AWS KMS's automatic key rotation, which
// keeps the key, or rewrap every KEK to the new key first (kleidi.Rewrap).
//
// # Tests
//
// The tests run against local-kms, an AWS-KMS-compatible server (go install
// github.com/nsmithuk/local-kms@v0.0.0-20260228092603-2a5e92d09ab6), which they start on loopback; without it
// they fail.

package awskms
