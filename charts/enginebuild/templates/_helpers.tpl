{{/* Names and labels shared by every template. */}}
{{- define "enginebuild.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "enginebuild.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "enginebuild.selectorLabels" -}}
app.kubernetes.io/name: {{ include "enginebuild.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "enginebuild.labels" -}}
{{ include "enginebuild.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: enginebuild
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "enginebuild.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "enginebuild.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The kopf peering object's name: peering.name, else the release's full name (one per release). */}}
{{- define "enginebuild.peeringName" -}}
{{- default (include "enginebuild.fullname" .) .Values.peering.name -}}
{{- end -}}

{{/* True (non-empty) when the operator watches the whole cluster. */}}
{{- define "enginebuild.clusterWide" -}}
{{- if not .Values.watchNamespaces -}}true{{- end -}}
{{- end -}}

{{/* Namespaces where Secrets may be read: secrets.namespaces, else the watched ones. */}}
{{- define "enginebuild.secretNamespaces" -}}
{{- if .Values.secrets.namespaces -}}
{{- toJson .Values.secrets.namespaces -}}
{{- else -}}
{{- toJson .Values.watchNamespaces -}}
{{- end -}}
{{- end -}}

{{/* Rules the operator needs in every namespace it watches. Exactly what its code calls
(tests/test_chart.py derives them from operator/*.py): kopf watches EngineBuilds and Jobs (list, watch)
and patches EngineBuilds (finalizer, progress annotations); the operator patches status, creates, reads
and deletes Jobs, lists Pods (termination messages) and posts Events. Jobs carry owner references with
blockOwnerDeletion, which needs update on enginebuilds/finalizers. */}}
{{- define "enginebuild.namespacedRules" -}}
- apiGroups: ["enginebuild.io"]
  resources: ["enginebuilds"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["enginebuild.io"]
  resources: ["enginebuilds/status"]
  verbs: ["patch"]
- apiGroups: ["enginebuild.io"]
  resources: ["enginebuilds/finalizers"]
  verbs: ["update"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["create", "get", "list", "watch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if and .Values.peering.enabled .Values.watchNamespaces }}
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end -}}

{{- define "enginebuild.secretRules" -}}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end -}}

{{- define "enginebuild.builderImage" -}}
{{- printf "%s:%s" .Values.builder.image.repository (default .Chart.AppVersion .Values.builder.image.tag) -}}
{{- end -}}
