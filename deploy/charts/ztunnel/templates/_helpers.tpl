{{/*
Labels on every object's metadata. `app.kubernetes.io/part-of` is the one kustomize puts on
deploy/base; the others are Helm's own (tests/helm.rs leaves exactly these out when it
compares the chart with deploy/base).
*/}}
{{- define "ztunnel.labels" -}}
app.kubernetes.io/part-of: ztunnel
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/*
The objects of one file of files/ (links into deploy/base and deploy/istio-compat, so that what
does not depend on a value is written once), each with the chart's labels added. Called with
(list $ "files/<path>").
*/}}
{{- define "ztunnel.objects" -}}
{{- $root := index . 0 -}}
{{- $path := index . 1 -}}
{{- $labels := include "ztunnel.labels" $root | fromYaml -}}
{{- range $doc := regexSplit "(?m)^---\\s*$" ($root.Files.Get $path) -1 }}
{{- $object := fromYaml $doc }}
{{- if hasKey $object "Error" }}
{{- fail (printf "%s: %s" $path $object.Error) }}
{{- end }}
{{- if $object }}
{{- $_ := set $object.metadata "labels" (merge (dict) $labels ($object.metadata.labels | default dict)) }}
---
{{ toYaml $object }}
{{- end }}
{{- end }}
{{- end }}

{{/* The one image of every container. */}}
{{- define "ztunnel.image" -}}
{{ .Values.image.hub }}/ztunnel:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/*
The selected platform's defaults (files/platforms/<platform>.yaml), as YAML; an unknown
platform fails the rendering.
*/}}
{{- define "ztunnel.platform" -}}
{{- $name := .Values.platform | default "generic" -}}
{{- $file := .Files.Get (printf "files/platforms/%s.yaml" $name) -}}
{{- if not $file -}}
{{- fail (printf "platform %q has no file in files/platforms/" .Values.platform) -}}
{{- end -}}
{{- $file -}}
{{- end }}

{{/* One CNI directory ("confDir", "binDir", "netnsDir"): the value, else the platform's. */}}
{{- define "ztunnel.cniDir" -}}
{{- $root := index . 0 -}}
{{- $key := index . 1 -}}
{{- $platform := include "ztunnel.platform" $root | fromYaml -}}
{{- index $root.Values.cni $key | default (index $platform.cni $key) -}}
{{- end }}

{{/* The daemon's SELinux options: the value, else the platform's (possibly none). */}}
{{- define "ztunnel.seLinuxOptions" -}}
{{- $platform := include "ztunnel.platform" . | fromYaml -}}
{{- $options := .Values.daemon.seLinuxOptions | default (dig "daemon" "seLinuxOptions" dict $platform) -}}
{{- if $options -}}
{{ toYaml $options }}
{{- end -}}
{{- end }}

{{/* Whether an optional part is on ("resourceQuota", "securityContextConstraints"): by its
value or by the platform. */}}
{{- define "ztunnel.enabled" -}}
{{- $root := index . 0 -}}
{{- $key := index . 1 -}}
{{- $platform := include "ztunnel.platform" $root | fromYaml -}}
{{- if or (index $root.Values $key).enabled (dig $key "enabled" false $platform) -}}
true
{{- end -}}
{{- end }}
