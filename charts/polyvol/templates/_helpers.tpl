{{/* Labels on every object's metadata. */}}
{{- define "polyvol.labels" -}}
app.kubernetes.io/name: polyvol
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
app.kubernetes.io/part-of: polyvol
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end }}

{{/* Selector labels of one component; fixed, so an upgrade never changes a selector. */}}
{{- define "polyvol.selectorLabels" -}}
app.kubernetes.io/name: polyvol
app.kubernetes.io/component: {{ . }}
{{- end }}

{{- define "polyvol.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The two driver names (fixed: StorageClasses and kubelet's plugin directories name them). */}}
{{- define "polyvol.networkDriver" -}}polyvol.csi.io{{- end }}
{{- define "polyvol.localDriver" -}}local.polyvol.csi.io{{- end }}

{{/* The checks that make a values file that cannot work fail at render time. */}}
{{- define "polyvol.validate" -}}
{{- if hasKey .Values "mode" }}
{{- fail "mode is gone: both drivers install together (drivers.network.enabled, drivers.local.enabled; local-only: drivers.network.enabled=false); see docs/install.md" }}
{{- end }}
{{- $network := .Values.drivers.network.enabled }}
{{- $local := .Values.drivers.local.enabled }}
{{- if not (or $network $local) }}
{{- fail "drivers.network.enabled and drivers.local.enabled are both false: nothing to install" }}
{{- end }}
{{- $classes := .Values.storageClasses }}
{{- if and $classes.localEphemeral.enabled (not $local) }}
{{- fail "storageClasses.localEphemeral needs drivers.local.enabled=true (its provisioner is local.polyvol.csi.io)" }}
{{- end }}
{{- if not $network }}
{{- range $key := list "remoteDisk" "replicated" "erasureCoded" }}
{{- if (index $classes $key).enabled }}
{{- fail (printf "storageClasses.%s needs drivers.network.enabled=true (its provisioner is polyvol.csi.io); set it to enabled=false without the network driver" $key) }}
{{- end }}
{{- end }}
{{- if .Values.ceph.enabled }}
{{- fail "ceph.enabled needs drivers.network.enabled=true (the Ceph classes are served by polyvol.csi.io)" }}
{{- end }}
{{- end }}
{{- if and (or $classes.replicated.enabled $classes.erasureCoded.enabled) (not .Values.ceph.enabled) }}
{{- fail "storageClasses.replicated/erasureCoded need ceph.enabled=true" }}
{{- end }}
{{- if and .Values.ceph.enabled (not .Values.ceph.monitors) }}
{{- fail "ceph.enabled needs ceph.monitors" }}
{{- end }}
{{- if and .Values.ceph.secret.create (not (and .Values.ceph.secret.userID .Values.ceph.secret.userKey)) }}
{{- fail "ceph.secret.create needs ceph.secret.userID and ceph.secret.userKey" }}
{{- end }}
{{- end }}

{{/* The plugin's --ceph-config, when the Ceph classes name a clusterID. */}}
{{- define "polyvol.cephConfig" -}}
{{- if and .Values.drivers.network.enabled .Values.ceph.enabled .Values.ceph.clusterID }}true{{ end -}}
{{- end }}
