{{/* The chart's name, or nameOverride. */}}
{{- define "kiln.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Name of the release's objects: fullnameOverride, else the release name if it
contains the chart's name, else <release>-<name>. 52 characters at most, so that
suffixed names (-metrics, -leader-election) stay within 63.
*/}}
{{- define "kiln.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kiln.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kiln.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kiln.labels" -}}
{{ include "kiln.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kiln.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kiln.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create=false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Lease the replicas elect a leader with (KILN_LEASE_NAME). */}}
{{- define "kiln.leaseName" -}}
{{- printf "%s-leader" (include "kiln.fullname" .) }}
{{- end }}

{{- define "kiln.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
The runner Pods' default image (KILN_RUNNER_IMAGE): runner.image if set, else
runner.repository:runner.tag (the appVersion by default), built from Dockerfile.runner.
*/}}
{{- define "kiln.runnerImage" -}}
{{- if .Values.runner.image }}
{{- .Values.runner.image }}
{{- else }}
{{- printf "%s:%s" (required "runner.repository is required (or set runner.image)" .Values.runner.repository) (.Values.runner.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Resources and placement of runner Pods (KILN_RUNNER_POD, JSON): only what is set.
*/}}
{{- define "kiln.runnerPod" -}}
{{- $pod := dict -}}
{{- with .Values.runner.resources }}{{ $_ := set $pod "resources" . }}{{ end -}}
{{- with .Values.runner.nodeSelector }}{{ $_ := set $pod "nodeSelector" . }}{{ end -}}
{{- with .Values.runner.tolerations }}{{ $_ := set $pod "tolerations" . }}{{ end -}}
{{- with .Values.runner.affinity }}{{ $_ := set $pod "affinity" . }}{{ end -}}
{{- with .Values.runner.priorityClassName }}{{ $_ := set $pod "priorityClassName" . }}{{ end -}}
{{- if $pod }}{{ toJson $pod }}{{ end -}}
{{- end }}

{{/*
Checks the values that values.schema.json cannot (or that a caller skipped the
schema for, with --skip-schema-validation): fails naming the value.
*/}}
{{- define "kiln.validate" -}}
{{- $format := .Values.log.format }}
{{- if not (has $format (list "text" "json")) }}
{{- fail (printf "log.format must be \"text\" or \"json\", not %q" (toString $format)) }}
{{- end }}
{{- $mode := .Values.aws.credentials.mode }}
{{- if not (has $mode (list "none" "irsa" "secret")) }}
{{- fail (printf "aws.credentials.mode must be \"none\", \"irsa\" or \"secret\", not %q" (toString $mode)) }}
{{- end }}
{{- if eq $mode "irsa" }}
{{- if not .Values.aws.irsa.roleArn }}
{{- fail "aws.irsa.roleArn is required when aws.credentials.mode is \"irsa\"" }}
{{- end }}
{{- if not .Values.serviceAccount.create }}
{{- fail "aws.credentials.mode \"irsa\" annotates the chart's ServiceAccount, so it needs serviceAccount.create=true (annotate your own ServiceAccount and use mode \"none\" instead)" }}
{{- end }}
{{- end }}
{{- if eq $mode "secret" }}
{{- if not .Values.aws.secret.name }}
{{- fail "aws.secret.name is required when aws.credentials.mode is \"secret\"" }}
{{- end }}
{{- if not (and .Values.aws.secret.accessKeyIdKey .Values.aws.secret.secretAccessKeyKey) }}
{{- fail "aws.secret.accessKeyIdKey and aws.secret.secretAccessKeyKey must not be empty when aws.credentials.mode is \"secret\"" }}
{{- end }}
{{- end }}
{{- range .Values.watchNamespaces }}
{{- if or (not .) (contains "," .) }}
{{- fail (printf "watchNamespaces: %q is not a namespace name" (toString .)) }}
{{- end }}
{{- end }}
{{- end }}
