package deploy_test

import (
	"strings"
	"testing"
)

// Tests of the chart's pkcs11 and awskms providers: what they render (ci/pkcs11.yaml, ci/awskms*.yaml, checked by
// TestHelmTemplate through checkPKCS11 and checkAWSKMS), the incomplete values they refuse, and that neither reads
// a key, a PIN or a credential through the Kubernetes API.

// checkPKCS11 checks the DaemonSet of ci/pkcs11.yaml: the provider's flags, the module and the PIN from the host
// (read-only), the module's configuration and token store at their host paths, and the token store's group.
func checkPKCS11(t *testing.T, text string) {
	t.Helper()
	for _, arg := range []string{"--provider=pkcs11", "--pkcs11-module=/usr/lib/softhsm/libsofthsm2.so",
		"--pkcs11-token=kleidi", "--pkcs11-key=kleidi", "--pkcs11-pin-file=/etc/kleidi/pkcs11/pin"} {
		mustMatch(t, "DaemonSet", text, `\n\s+- `+arg+`\n`, 1)
	}
	mustMatch(t, "DaemonSet", text, `name: pkcs11-module\n\s+mountPath: /usr/lib/softhsm/libsofthsm2.so\n\s+readOnly: true\n`, 1)
	mustMatch(t, "DaemonSet", text, `name: pkcs11-module\n\s+hostPath:\s*\n\s+path: /usr/lib/softhsm/libsofthsm2.so\n\s+type: File\n`, 1)
	mustMatch(t, "DaemonSet", text, `name: pkcs11-pin\n\s+mountPath: /etc/kleidi/pkcs11\n\s+readOnly: true\n`, 1)
	mustMatch(t, "DaemonSet", text, `name: pkcs11-pin\n\s+hostPath:\s*\n\s+path: /etc/kleidi/pkcs11\n\s+type: Directory\n`, 1)
	mustMatch(t, "DaemonSet", text, `mountPath: /etc/softhsm/softhsm2.conf\n\s+readOnly: true\n`, 1)
	mustMatch(t, "DaemonSet", text, `hostPath:\s*\n\s+path: /etc/softhsm/softhsm2.conf\n\s+type: File\n`, 1)
	mustMatch(t, "DaemonSet", text, `mountPath: /var/lib/softhsm/tokens\n\s+readOnly: false\n`, 1)
	mustMatch(t, "DaemonSet", text, `hostPath:\s*\n\s+path: /var/lib/softhsm/tokens\n\s+type: Directory\n`, 1)
	mustMatch(t, "DaemonSet", text, `supplementalGroups:\s*\n\s+- 108\n`, 1)
	mustMatch(t, "DaemonSet", text, `- name: SOFTHSM2_CONF\n\s+value: /etc/softhsm/softhsm2.conf\n`, 1)
	// Nothing the plugin needs at start comes from the API.
	mustNotMatch(t, "DaemonSet", text, `gpg|secret:|secretName|configMap|projected:|secretKeyRef|configMapKeyRef|fsGroup`)
}

// checkAWSKMS checks the DaemonSet of ci/awskms.yaml (IRSA: nothing but flags) or of
// ci/awskms-credentials-file.yaml (the SDK's shared files from the host, read-only).
func checkAWSKMS(t *testing.T, text string, credentialsFile bool) {
	t.Helper()
	mustMatch(t, "DaemonSet", text, `\n\s+- --provider=awskms\n`, 1)
	mustMatch(t, "DaemonSet", text, `\n\s+- --awskms-key=\S+\n`, 1)
	mustMatch(t, "DaemonSet", text, `\n\s+- --awskms-signing-key=\S+\n`, 1)
	mustMatch(t, "DaemonSet", text, `\n\s+- --awskms-region=eu-west-1\n`, 1)
	if credentialsFile {
		mustMatch(t, "DaemonSet", text, `\n\s+- --awskms-endpoint=https://vpce-\S+\n`, 1)
		mustMatch(t, "DaemonSet", text, `- name: AWS_SHARED_CREDENTIALS_FILE\n\s+value: /etc/kleidi/aws/credentials\n`, 1)
		mustMatch(t, "DaemonSet", text, `- name: AWS_CONFIG_FILE\n\s+value: /etc/kleidi/aws/config\n`, 1)
		mustMatch(t, "DaemonSet", text, `name: aws-credentials\n\s+mountPath: /etc/kleidi/aws\n\s+readOnly: true\n`, 1)
		mustMatch(t, "DaemonSet", text, `name: aws-credentials\n\s+hostPath:\s*\n\s+path: /etc/kleidi/aws\n\s+type: Directory\n`, 1)
	} else {
		mustMatch(t, "DaemonSet", text, `\n\s+- "--awskms-context=cluster=prod-1"\n`, 1)
		mustMatch(t, "DaemonSet", text, `\n\s+- --awskms-timeout=10s\n`, 1)
		mustNotMatch(t, "DaemonSet", text, `AWS_|aws-credentials|--awskms-endpoint`)
	}
	// No host key, no device, no group: the key stays in AWS KMS.
	mustNotMatch(t, "DaemonSet", text, `gpg|supplementalGroups|secret:|secretName|configMap|projected:|secretKeyRef|configMapKeyRef|fsGroup`)
}

// TestChartRefusesIncompleteProviders checks that provider pkcs11 and awskms are refused without what they need,
// that a PIN or a credential cannot come from a Secret or be written into the pod spec, and that pkcs11 gets the
// cgo image unless a tag is given.
func TestChartRefusesIncompleteProviders(t *testing.T) {
	helm := helmBin(t)
	pkcs11 := []string{"provider=pkcs11", "pkcs11.module=/usr/lib/softhsm/libsofthsm2.so", "pkcs11.token=kleidi", "pkcs11.key=kleidi"}
	aws := []string{"provider=awskms", "awskms.key=alias/kleidi", "awskms.signingKey=alias/kleidi-proof", "awskms.region=eu-west-1"}
	with := func(base []string, set ...string) []string { return append(append([]string{}, base...), set...) }
	helmRefuses(t, helm, []struct {
		set  []string
		want string
	}{
		{[]string{"provider=pkcs11"}, "/pkcs11"},
		{pkcs11[:3], "/pkcs11/key"},
		{[]string{"provider=pkcs11", "pkcs11.module=/usr/lib/softhsm/libsofthsm2.so", "pkcs11.key=kleidi"}, "/pkcs11/token"},
		{with(pkcs11[1:], "provider=pkcs11", "pkcs11.module="), "/pkcs11/module"},
		{with(pkcs11, "pkcs11.module=libsofthsm2.so"), "/pkcs11/module"},
		{with(pkcs11, "pkcs11.key=id:zz"), "/pkcs11/key"},
		{with(pkcs11, "pkcs11.pinHostDir="), "/pkcs11/pinHostDir"},
		{with(pkcs11, "pkcs11.pinFile=../pin"), "/pkcs11/pinFile"},
		{with(pkcs11, "pkcs11.hostPaths[0].path=var/lib/softhsm"), "/pkcs11/hostPaths/0/path"},
		{with(pkcs11, "pkcs11.supplementalGroups[0]=0"), "/pkcs11/supplementalGroups/0"},
		// The PIN only from the host: a Secret would deadlock a cold start.
		{with(pkcs11, "pkcs11.existingSecret=kleidi-pin"), "existingSecret"},
		{with(pkcs11, "extraEnv[0].name=PIN", "extraEnv[0].valueFrom.secretKeyRef.name=kleidi",
			"extraEnv[0].valueFrom.secretKeyRef.key=pin"), "from a Secret"},

		{[]string{"provider=awskms"}, "/awskms"},
		{aws[:3], "/awskms/region"},
		{with(aws[:2], "awskms.region=eu-west-1"), "/awskms/signingKey"},
		{with(aws[2:], "provider=awskms"), "/awskms/key"},
		{with(aws, "awskms.region=Ireland"), "/awskms/region"},
		{with(aws, "awskms.endpoint=kms.eu-west-1.amazonaws.com"), "/awskms/endpoint"},
		{with(aws, "awskms.timeout=10"), "/awskms/timeout"},
		{with(aws, `awskms.context.a=b\,c`), "/awskms/context"},
		{with(aws, "awskms.credentialsHostDir=aws"), "/awskms/credentialsHostDir"},
		// Credentials neither from a Secret nor written in the DaemonSet.
		{with(aws, "awskms.existingSecret=aws"), "existingSecret"},
		{with(aws, "extraEnv[0].name=AWS_SECRET_ACCESS_KEY", "extraEnv[0].valueFrom.secretKeyRef.name=aws",
			"extraEnv[0].valueFrom.secretKeyRef.key=secret"), "from a Secret"},
		{with(aws, "extraEnv[0].name=AWS_SECRET_ACCESS_KEY", "extraEnv[0].value=example"), "extraEnv AWS_SECRET_ACCESS_KEY writes an AWS credential"},
		{with(aws, "extraEnv[0].name=AWS_SESSION_TOKEN", "extraEnv[0].value=example"), "awskms.credentialsHostDir"},
		{with(aws, "extraEnv[0].name=AWS_SECRET_KEY", "extraEnv[0].value=example"), "awskms.credentialsHostDir"},
		{with(aws, "extraEnv[0].name=AWS_ACCESS_KEY_ID", "extraEnv[0].value=AKIAEXAMPLE"), "awskms.credentialsHostDir"},
	})

	// pkcs11 runs the cgo image unless the tag is given; every other provider the static one.
	render := []string{"template", "kleidi", chartDir, "--show-only", "templates/daemonset.yaml"}
	out := mustRun(t, "", helm, append(render, sets(pkcs11...)...)...)
	mustMatch(t, "DaemonSet", out, `image: ghcr.io/kleidi-kms/kleidi:0\.1\.0-cgo\n`, 1)
	out = mustRun(t, "", helm, append(render, sets(with(pkcs11, "image.tag=0.1.0-cgo-softhsm")...)...)...)
	mustMatch(t, "DaemonSet", out, `image: ghcr.io/kleidi-kms/kleidi:0\.1\.0-cgo-softhsm\n`, 1)
	out = mustRun(t, "", helm, append(render, sets(aws...)...)...)
	mustMatch(t, "DaemonSet", out, `image: ghcr.io/kleidi-kms/kleidi:0\.1\.0\n`, 1)

	notes := oneLine(renderNotes(t, helm, sets(pkcs11...)...))
	for _, want := range []string{"the cgo image (ghcr.io/kleidi-kms/kleidi:0.1.0-cgo)", "install -d -o root -g 65532 -m 0750 /etc/kleidi/pkcs11",
		"install -o root -g 65532 -m 0440 pin /etc/kleidi/pkcs11/", "never from the Kubernetes API"} {
		if !strings.Contains(notes, want) {
			t.Errorf("NOTES.txt for pkcs11 lacks %q:\n%s", want, notes)
		}
	}
	notes = oneLine(renderNotes(t, helm, sets(with(aws, "serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::111122223333:role/kleidi")...)...))
	for _, want := range []string{"AWS KMS in eu-west-1", "IRSA, the role arn:aws:iam::111122223333:role/kleidi",
		"kms:Sign and kms:GetPublicKey on alias/kleidi-proof"} {
		if !strings.Contains(notes, want) {
			t.Errorf("NOTES.txt for awskms lacks %q:\n%s", want, notes)
		}
	}
}

// sets turns each value of set into a --set flag.
func sets(set ...string) []string {
	var out []string
	for _, s := range set {
		out = append(out, "--set", s)
	}
	return out
}

// oneLine joins the words of text with single spaces, so that a check does not depend on where a line breaks.
func oneLine(text string) string {
	return strings.Join(strings.Fields(text), " ")
}
