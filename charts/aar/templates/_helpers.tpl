{{/* Chart name, overridable with .Values.nameOverride. */}}
{{- define "aar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, or .Values.fullnameOverride; 63 characters at most (DNS label). */}}
{{- define "aar.fullname" -}}
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

{{/* chart-version, for the helm.sh/chart label. */}}
{{- define "aar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object the chart makes. */}}
{{- define "aar.labels" -}}
helm.sh/chart: {{ include "aar.chart" . }}
{{ include "aar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: aar
{{- end }}

{{/* Labels a selector matches on; never change them once released. */}}
{{- define "aar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "aar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}
