{{/* Chart name, at most 63 characters. */}}
{{- define "kleidi.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name, at most 63 characters (a DNS label). */}}
{{- define "kleidi.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kleidi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kleidi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kleidi.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kleidi.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: kms-plugin
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kleidi.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kleidi.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference: repository:tag, and @digest when image.digest is set. provider pkcs11 loads its module with
dlopen, which the static image cannot: its default tag is the cgo image's, the appVersion followed by "-cgo".
*/}}
{{- define "kleidi.image" -}}
{{- $tag := .Chart.AppVersion }}
{{- if eq .Values.provider "pkcs11" }}{{ $tag = printf "%s-cgo" .Chart.AppVersion }}{{ end }}
{{- printf "%s:%s" .Values.image.repository (default $tag .Values.image.tag) }}
{{- with .Values.image.digest }}@{{ . }}{{ end }}
{{- end }}

{{/* The Prometheus job of the ServiceMonitor: the value of its jobLabel on the metrics Service. */}}
{{- define "kleidi.job" -}}
{{- include "kleidi.name" . }}
{{- end }}

{{/*
Refusals the schema cannot express with a clear message. Rendered by the DaemonSet.
*/}}
{{- define "kleidi.validate" -}}
{{- $v := .Values }}
{{- if eq $v.provider "gpg" }}
{{- if and $v.gpg.existingSecret (not $v.gpg.acknowledgeSecretColdStartDeadlock) }}
{{- fail (printf "gpg.existingSecret=%s reads the OpenPGP keys through the Kubernetes API. Once Secrets are encrypted by kleidi that Secret is too: on a cold start, or when a lone control-plane node reboots, the kubelet needs it to start the plugin and kube-apiserver needs the plugin to read it, and neither starts. Put the key files in gpg.hostDir (%s) on every control-plane node instead, or set gpg.acknowledgeSecretColdStartDeadlock=true to accept the deadlock" $v.gpg.existingSecret $v.gpg.hostDir) }}
{{- end }}
{{- if and (not $v.gpg.existingSecret) (not $v.gpg.hostDir) }}
{{- fail "provider gpg needs gpg.hostDir: the directory on each control-plane node holding the OpenPGP key files" }}
{{- end }}
{{- end }}
{{- if eq $v.provider "tpm" }}
{{- if kindIs "invalid" $v.tpm.tssGid }}
{{- fail "provider tpm needs tpm.tssGid: the numeric gid of the tss group on the nodes (getent group tss)" }}
{{- end }}
{{- $ways := 0 }}
{{- if $v.tpm.deviceResource }}{{ $ways = add1 $ways }}{{ end }}
{{- if $v.tpm.cdiDevice }}{{ $ways = add1 $ways }}{{ end }}
{{- if $v.tpm.hostPathDeviceAllowedByRuntime }}{{ $ways = add1 $ways }}{{ end }}
{{- if eq $ways 0 }}
{{- fail (printf "provider tpm needs a way for the TPM to reach a non-privileged container: a hostPath character device (%s) is blocked by the device cgroup of stock containerd and CRI-O. Set one of tpm.deviceResource (a device plugin's extended resource), tpm.cdiDevice (a CDI device name) or tpm.hostPathDeviceAllowedByRuntime=true (a runtime configured to allow the device)" $v.tpm.device) }}
{{- end }}
{{- if gt $ways 1 }}
{{- fail "provider tpm takes one of tpm.deviceResource, tpm.cdiDevice and tpm.hostPathDeviceAllowedByRuntime, not several" }}
{{- end }}
{{- if and (not $v.tpm.nodeName) (not $v.tpm.acknowledgeSingleControlPlaneNode) }}
{{- fail "provider tpm runs on one control-plane node only: kleidi does not share a TPM root between nodes yet, so each node would encrypt under a key the others cannot unwrap. Set tpm.nodeName to that node, or tpm.acknowledgeSingleControlPlaneNode=true if nodeSelector matches a single node" }}
{{- end }}
{{- end }}
{{- if eq $v.provider "pkcs11" }}
{{- if not (and $v.pkcs11.module $v.pkcs11.token $v.pkcs11.key $v.pkcs11.pinHostDir $v.pkcs11.pinFile) }}
{{- fail "provider pkcs11 needs pkcs11.module (the module's path on every control-plane node), pkcs11.token, pkcs11.key, and pkcs11.pinHostDir with pkcs11.pinFile (the PIN file on the host, never a Secret)" }}
{{- end }}
{{- end }}
{{- if eq $v.provider "awskms" }}
{{- if not (and $v.awskms.key $v.awskms.signingKey $v.awskms.region) }}
{{- fail "provider awskms needs awskms.key (the symmetric key that wraps KEKs), awskms.signingKey (the ECC key that proves them) and awskms.region" }}
{{- end }}
{{- end }}
{{- range $v.extraEnv }}
{{- if and .valueFrom (or .valueFrom.secretKeyRef .valueFrom.configMapKeyRef) }}
{{- fail (printf "extraEnv %s takes its value from a Secret or ConfigMap, which the kubelet reads through the API: the plugin must start while kube-apiserver cannot read any Secret" .name) }}
{{- end }}
{{- if has .name (list "AWS_SECRET_ACCESS_KEY" "AWS_SECRET_KEY" "AWS_SESSION_TOKEN" "AWS_ACCESS_KEY_ID" "AWS_ACCESS_KEY") }}
{{- fail (printf "extraEnv %s writes an AWS credential into the DaemonSet, where everyone who may read DaemonSets reads it. Let the AWS SDK find credentials itself: the node's instance role, a shared credentials file on the host (awskms.credentialsHostDir), or IRSA / EKS Pod Identity (serviceAccount.annotations; they need the API at start)" .name) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The KMS endpoint, as kube-apiserver's EncryptionConfiguration names it. */}}
{{- define "kleidi.endpoint" -}}
{{- printf "unix://%s/%s" (trimSuffix "/" .Values.socket.hostDir) .Values.socket.name }}
{{- end }}
