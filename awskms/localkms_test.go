package awskms

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"
)

// The tests run against local-kms, a real AWS-KMS-compatible server (it enforces the encryption context and key
// states). It is required: a missing binary fails the tests.
const localKMSInstall = "go install github.com/nsmithuk/local-kms@v0.0.0-20260228092603-2a5e92d09ab6"

// testRegion is local-kms's region for the tests; it accepts any credentials.
const testRegion = "eu-west-2"

// localKMSPath returns the local-kms binary: $LOCAL_KMS, local-kms on PATH, in $(go env GOPATH)/bin or in
// /tmp/gobin.
func localKMSPath() (string, error) {
	if p := os.Getenv("LOCAL_KMS"); p != "" {
		return p, nil
	}
	if p, err := exec.LookPath("local-kms"); err == nil {
		return p, nil
	}
	candidates := []string{"/tmp/gobin/local-kms"}
	if out, err := exec.Command("go", "env", "GOPATH").Output(); err == nil {
		for _, dir := range filepath.SplitList(strings.TrimSpace(string(out))) {
			candidates = append(candidates, filepath.Join(dir, "bin", "local-kms"))
		}
	}
	for _, p := range candidates {
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("local-kms not found ($LOCAL_KMS, PATH, $(go env GOPATH)/bin, /tmp/gobin): %s", localKMSInstall)
}

// localKMS is a running local-kms process.
type localKMS struct {
	bin, dataDir string
	port         string
	cmd          *exec.Cmd
	done         chan struct{}
	log          *syncBuffer
}

var startedOn = regexp.MustCompile(`Local KMS started on 0\.0\.0\.0:(\d+)`)

// startLocalKMS starts local-kms with its LevelDB in dataDir, on port ("0": any free port).
func startLocalKMS(dataDir, port string) (*localKMS, error) {
	bin, err := localKMSPath()
	if err != nil {
		return nil, err
	}
	s := &localKMS{bin: bin, dataDir: dataDir, done: make(chan struct{}), log: &syncBuffer{}}
	s.cmd = exec.Command(bin)
	s.cmd.Env = append(os.Environ(), "PORT="+port, "KMS_DATA_PATH="+dataDir, "KMS_REGION="+testRegion)
	r, w := io.Pipe()
	s.cmd.Stdout, s.cmd.Stderr = w, w
	if err := s.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	found := make(chan string, 1)
	// The goroutines use their own copies of s's fields: restart replaces s.
	log, cmd, done := s.log, s.cmd, s.done
	go func() {
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			log.add(sc.Text())
			if m := startedOn.FindStringSubmatch(sc.Text()); m != nil {
				select {
				case found <- m[1]:
				default:
				}
			}
		}
	}()
	go func() {
		cmd.Wait()
		w.Close()
		close(done)
	}()
	select {
	case s.port = <-found:
		return s, nil
	case <-s.done:
		return nil, fmt.Errorf("local-kms exited at start: %s", s.log)
	case <-time.After(15 * time.Second):
		s.stop()
		return nil, fmt.Errorf("local-kms did not start in 15 s: %s", s.log)
	}
}

// endpoint is the base URL of the server.
func (s *localKMS) endpoint() string { return "http://127.0.0.1:" + s.port }

// stop kills the server and waits for it to exit.
func (s *localKMS) stop() {
	s.cmd.Process.Kill()
	<-s.done
}

// restart starts the server again on the same port and data.
func (s *localKMS) restart() error {
	n, err := startLocalKMS(s.dataDir, s.port)
	if err != nil {
		return err
	}
	*s = *n
	return nil
}

// syncBuffer keeps the last lines of a process's output, for failure messages.
type syncBuffer struct {
	mu    sync.Mutex
	lines []string
}

func (b *syncBuffer) add(line string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.lines = append(b.lines, line)
	if len(b.lines) > 20 {
		b.lines = b.lines[1:]
	}
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.Join(b.lines, "\n")
}

// server is the local-kms that the package's tests share, and sharedKeys keys on it, made by TestMain.
var (
	server     *localKMS
	sharedKeys testKeys
)

func TestMain(m *testing.M) {
	// The SDK's default credentials chain, pointed at static credentials: no shared files, no instance metadata.
	for k, v := range map[string]string{
		"AWS_ACCESS_KEY_ID":           "AKIAKLEIDITEST",
		"AWS_SECRET_ACCESS_KEY":       "kleidi-test-not-a-secret",
		"AWS_SESSION_TOKEN":           "",
		"AWS_PROFILE":                 "",
		"AWS_REGION":                  "",
		"AWS_CONFIG_FILE":             os.DevNull,
		"AWS_SHARED_CREDENTIALS_FILE": os.DevNull,
		"AWS_EC2_METADATA_DISABLED":   "true",
	} {
		os.Setenv(k, v)
	}
	dir, err := os.MkdirTemp("", "kleidi-awskms-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	server, err = startLocalKMS(dir, "0")
	if err != nil {
		fmt.Fprintln(os.Stderr, "awskms tests need local-kms:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	if sharedKeys, err = createKeys(server.endpoint()); err != nil {
		fmt.Fprintln(os.Stderr, err)
		server.stop()
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	server.stop()
	os.RemoveAll(dir)
	os.Exit(code)
}

// adminClient is a KMS client for the tests' own calls (creating, disabling keys) to the server at endpoint.
func adminClient(endpoint string) *kms.Client {
	return kms.New(kms.Options{
		Region:       testRegion,
		BaseEndpoint: aws.String(endpoint),
		Credentials:  credentials.NewStaticCredentialsProvider("AKIAKLEIDITEST", "kleidi-test-not-a-secret", ""),
	})
}

// testKeys are the KMS keys of a provider: a symmetric encryption key and an ECC signing key.
type testKeys struct {
	encrypt, sign string // ARNs
}

// createKeys creates a fresh pair of keys on the server at endpoint.
func createKeys(endpoint string) (testKeys, error) {
	c := adminClient(endpoint)
	ctx := context.Background()
	enc, err := c.CreateKey(ctx, &kms.CreateKeyInput{Description: aws.String("kleidi test KEK wrapping")})
	if err != nil {
		return testKeys{}, fmt.Errorf("CreateKey(SYMMETRIC_DEFAULT) err = %w, want nil", err)
	}
	sig, err := c.CreateKey(ctx, &kms.CreateKeyInput{
		Description: aws.String("kleidi test proofs"),
		KeySpec:     types.KeySpecEccNistP256,
		KeyUsage:    types.KeyUsageTypeSignVerify,
	})
	if err != nil {
		return testKeys{}, fmt.Errorf("CreateKey(ECC_NIST_P256, SIGN_VERIFY) err = %w, want nil", err)
	}
	return testKeys{encrypt: *enc.KeyMetadata.Arn, sign: *sig.KeyMetadata.Arn}, nil
}

// mustCreateKeys is createKeys for a test.
func mustCreateKeys(t testing.TB, endpoint string) testKeys {
	t.Helper()
	keys, err := createKeys(endpoint)
	if err != nil {
		t.Fatal(err)
	}
	return keys
}

// newTestProvider returns a provider of keys on the server at endpoint, closed at the end of the test.
func newTestProvider(t testing.TB, endpoint string, keys testKeys, mutate ...func(*Config)) *Provider {
	t.Helper()
	c := Config{KeyID: keys.encrypt, SigningKeyID: keys.sign, Region: testRegion, Endpoint: endpoint, Timeout: 5 * time.Second}
	for _, f := range mutate {
		f(&c)
	}
	p, err := New(context.Background(), c)
	if err != nil {
		t.Fatalf("New(ctx, %+v) err = %v, want nil", c, err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// newSharedProvider returns a provider of the shared keys on the shared server.
func newSharedProvider(t testing.TB, mutate ...func(*Config)) *Provider {
	t.Helper()
	return newTestProvider(t, server.endpoint(), sharedKeys, mutate...)
}
