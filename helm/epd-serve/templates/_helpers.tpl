{{/* Names and labels. */}}
{{- define "epd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "epd.fullname" -}}
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

{{/* Labels of every object; `component` is router, encode, prefill or decode. */}}
{{- define "epd.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{ include "epd.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "epd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "epd.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The label selector the router watches a pool's pods with (--k8s-selector). */}}
{{- define "epd.poolSelector" -}}
app.kubernetes.io/name={{ include "epd.name" .root }},app.kubernetes.io/instance={{ .root.Release.Name }},app.kubernetes.io/component={{ .component }}
{{- end -}}

{{- define "epd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "epd.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "epd.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{/* --model and --served-model-name, as a YAML list of args (empty for the built-in tiny model). */}}
{{- define "epd.modelArgs" -}}
{{- $m := .Values.model -}}
{{- if ne $m.source "builtin" }}
- --model
- {{ trimSuffix "/" (printf "%s/%s" $m.mountPath $m.path) | quote }}
{{- else if ne $m.builtin "tiny" }}
- --model
- {{ $m.builtin | quote }}
{{- end }}
{{- end -}}

{{/* The downward-API environment every container gets, then the component's own. */}}
{{- define "epd.env" -}}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: POD_IP
  valueFrom: {fieldRef: {fieldPath: status.podIP}}
{{- with .env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "epd.volumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shm.sizeLimit }}
{{- $m := .Values.model }}
{{- if eq $m.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ required "model.pvc.claimName is required with model.source=pvc" $m.pvc.claimName }}
    readOnly: {{ $m.pvc.readOnly }}
{{- else if eq $m.source "hostPath" }}
- name: model
  hostPath:
    path: {{ required "model.hostPath.path is required with model.source=hostPath" $m.hostPath.path }}
    type: {{ $m.hostPath.type }}
{{- else if eq $m.source "initContainer" }}
- name: model
  emptyDir:
    sizeLimit: {{ $m.initContainer.sizeLimit }}
{{- end }}
{{- end -}}

{{- define "epd.volumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
{{- if ne .Values.model.source "builtin" }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: {{ ne .Values.model.source "initContainer" }}
{{- end }}
{{- end -}}

{{- define "epd.initContainers" -}}
{{- $m := .Values.model -}}
{{- if eq $m.source "initContainer" }}
initContainers:
  - name: model
    image: {{ default (include "epd.image" .) $m.initContainer.image }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    {{- with $m.initContainer.command }}
    command: {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $m.initContainer.args }}
    args: {{- toYaml . | nindent 6 }}
    {{- end }}
    env:
      - name: MODEL_DIR
        value: {{ trimSuffix "/" (printf "%s/%s" $m.mountPath $m.path) | quote }}
      {{- with $m.initContainer.env }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- with $m.initContainer.resources }}
    resources: {{- toYaml . | nindent 6 }}
    {{- end }}
    securityContext: {{- toYaml .Values.securityContext | nindent 6 }}
    volumeMounts:
      - name: model
        mountPath: {{ $m.mountPath }}
{{- end }}
{{- end -}}

{{/* Spread constraints with the component's own pod labels filled in where none are given. */}}
{{- define "epd.topologySpread" -}}
{{- $labels := include "epd.selectorLabels" . | fromYaml -}}
{{- range .constraints }}
- {{ toYaml (merge (deepCopy .) (dict "labelSelector" (dict "matchLabels" $labels))) | nindent 2 | trim }}
{{- end }}
{{- end -}}

{{/* A PodDisruptionBudget spec body: minAvailable if set, else maxUnavailable. */}}
{{- define "epd.pdbBudget" -}}
{{- if not (kindIs "invalid" .minAvailable) }}
minAvailable: {{ .minAvailable }}
{{- else }}
maxUnavailable: {{ default 1 .maxUnavailable }}
{{- end }}
{{- end -}}
