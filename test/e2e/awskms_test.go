package e2e

import (
	"bytes"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// localKMSInstall installs local-kms, the AWS-KMS-compatible server the awskms suite runs against.
const localKMSInstall = "go install github.com/nsmithuk/local-kms@v0.0.0-20260228092603-2a5e92d09ab6"

// localKMSSecretKey is the plugin's AWS secret access key: local-kms accepts any
// credentials, and the suite checks that the plugin never logs them.
const localKMSSecretKey = "kleidi-e2e-not-a-secret"

// localKMSRegion is the region local-kms serves and the plugin is configured with.
const localKMSRegion = "eu-west-2"

// localKMS is a local-kms process: its LevelDB lives in dir, so a restart on the same port keeps every key.
type localKMS struct {
	bin   string
	dir   string
	port  string
	procs *procs
	proc  *proc
}

var localKMSStarted = regexp.MustCompile(`Local KMS started on 0\.0\.0\.0:(\d+)`)

// localKMSPath finds local-kms on PATH or in $(go env GOPATH)/bin, and fails the test with the install line when
// it is in neither.
func localKMSPath(t testing.TB) string {
	t.Helper()
	if p, err := exec.LookPath("local-kms"); err == nil {
		return p
	}
	if out, err := exec.Command("go", "env", "GOPATH").Output(); err == nil {
		for _, dir := range filepath.SplitList(strings.TrimSpace(string(out))) {
			p := filepath.Join(dir, "bin", "local-kms")
			if _, err := os.Stat(p); err == nil {
				return p
			}
		}
	}
	t.Fatalf("local-kms not found on PATH or in $(go env GOPATH)/bin: %s", localKMSInstall)
	return ""
}

// startLocalKMS starts local-kms on a free port with its data in dir.
func startLocalKMS(t testing.TB, ps *procs, dir string) *localKMS {
	t.Helper()
	s := &localKMS{bin: localKMSPath(t), dir: dir, port: "0", procs: ps}
	if err := os.MkdirAll(filepath.Join(dir, "data"), 0o700); err != nil {
		t.Fatal(err)
	}
	s.start(t)
	return s
}

// start runs local-kms on s.port ("0" for any free port, then learnt from its log) and waits until it accepts
// connections.
func (s *localKMS) start(t testing.TB) {
	t.Helper()
	logPath := filepath.Join(s.dir, "local-kms.log")
	before, _ := os.ReadFile(logPath)
	s.proc = s.procs.start(t, "local-kms", logPath,
		[]string{"PORT=" + s.port, "KMS_DATA_PATH=" + filepath.Join(s.dir, "data"), "KMS_REGION=" + localKMSRegion},
		s.bin)
	eventually(t, 15*time.Second, 50*time.Millisecond, "local-kms listening", func() error {
		if s.proc.exited() {
			t.Fatalf("local-kms exited: %v\n%s", s.proc.waitErr, tail(s.proc.logPath, 20))
		}
		if s.port == "0" {
			b, err := os.ReadFile(logPath)
			if err != nil {
				return err
			}
			m := localKMSStarted.FindSubmatch(b[min(len(before), len(b)):])
			if m == nil {
				return errNotYet
			}
			s.port = string(m[1])
		}
		conn, err := net.DialTimeout("tcp", "127.0.0.1:"+s.port, time.Second)
		if err != nil {
			return err
		}
		return conn.Close()
	})
}

func (s *localKMS) endpoint() string { return "http://127.0.0.1:" + s.port }

// createKey calls CreateKey with spec and usage and returns the key's ARN. local-kms accepts requests without a
// signature; the suite needs no AWS SDK for its own few calls.
func (s *localKMS) createKey(t testing.TB, spec, usage string) string {
	t.Helper()
	body, err := json.Marshal(map[string]string{"KeySpec": spec, "KeyUsage": usage, "Description": "kleidi e2e " + spec})
	if err != nil {
		t.Fatal(err)
	}
	req, err := http.NewRequest(http.MethodPost, s.endpoint()+"/", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/x-amz-json-1.1")
	req.Header.Set("X-Amz-Target", "TrentService.CreateKey")
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("local-kms CreateKey(%s, %s): %v", spec, usage, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var out struct{ KeyMetadata struct{ Arn string } }
	if resp.StatusCode != http.StatusOK || json.Unmarshal(b, &out) != nil || out.KeyMetadata.Arn == "" {
		t.Fatalf("local-kms CreateKey(%s, %s): %d %s", spec, usage, resp.StatusCode, b)
	}
	return out.KeyMetadata.Arn
}

// awsKMSPlugin creates the plugin's two keys, a symmetric one that wraps KEKs and an ECC one that signs their
// proofs, and returns its provider flags and environment: static credentials (local-kms accepts any), the region,
// and no shared configuration or instance metadata, so the SDK's default chain finds nothing else.
func awsKMSPlugin(t testing.TB, s *localKMS) (flags, env []string) {
	t.Helper()
	start := time.Now()
	wrapKey := s.createKey(t, "SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT")
	signKey := s.createKey(t, "ECC_NIST_P256", "SIGN_VERIFY")
	t.Logf("local-kms keys created in %s", time.Since(start).Round(time.Millisecond))
	flags = []string{
		"--awskms-key=" + wrapKey,
		"--awskms-signing-key=" + signKey,
		"--awskms-region=" + localKMSRegion,
		"--awskms-endpoint=" + s.endpoint(),
	}
	env = []string{
		"AWS_ACCESS_KEY_ID=AKIAKLEIDIE2E",
		"AWS_SECRET_ACCESS_KEY=" + localKMSSecretKey,
		"AWS_SESSION_TOKEN=",
		"AWS_PROFILE=",
		"AWS_REGION=" + localKMSRegion,
		"AWS_CONFIG_FILE=" + os.DevNull,
		"AWS_SHARED_CREDENTIALS_FILE=" + os.DevNull,
		"AWS_EC2_METADATA_DISABLED=true",
	}
	return flags, env
}
