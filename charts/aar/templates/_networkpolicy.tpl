{{/* Peers of the components' NetworkPolicies (docs/operations.md, Network policies). */}}

{{/* The agents: every Pod the operator makes for an AgentSandbox (operator/builders.py labels
them), in whichever namespace its run is: one of operator.runNamespaces when they are listed. */}}
{{- define "aar.agentPeer" -}}
{{- with .Values.operator.runNamespaces -}}
- namespaceSelector:
    matchExpressions:
      - key: kubernetes.io/metadata.name
        operator: In
        values: {{ toJson . }}
{{- else -}}
- namespaceSelector: {}
{{- end }}
  podSelector:
    matchLabels:
      app.kubernetes.io/name: aar-agent
      app.kubernetes.io/component: agent
{{- end }}

{{/* One of the chart's own components, by its Pods' labels, in the release namespace: for a
policy in another namespace (the scorer's) the namespace is named by the label Kubernetes sets
from 1.21 on. Arguments: (list $ "component"). */}}
{{- define "aar.componentPeer" -}}
{{- $root := index . 0 -}}
- namespaceSelector:
    matchLabels:
      kubernetes.io/metadata.name: {{ $root.Release.Namespace }}
  podSelector:
    matchLabels:
      {{- include "aar.selectorLabels" $root | nindent 6 }}
      app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* One of the chart's own components in the release namespace, for a policy there (no
namespace selector: the policy's own namespace). Arguments: (list $ "component"). */}}
{{- define "aar.localPeer" -}}
- podSelector:
    matchLabels:
      {{- include "aar.selectorLabels" (index . 0) | nindent 6 }}
      app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Prometheus, as networkPolicy.prometheus names it. */}}
{{- define "aar.prometheusPeer" -}}
{{- $prometheus := .Values.networkPolicy.prometheus -}}
- namespaceSelector:
    matchLabels:
      kubernetes.io/metadata.name: {{ $prometheus.namespace }}
  podSelector:
    {{- toYaml $prometheus.podSelector | nindent 4 }}
{{- end }}

{{/* The port every component serves /metrics on, as a NetworkPolicy port. */}}
{{- define "aar.metricsPolicyPort" -}}
- protocol: TCP
  port: {{ .Values.metrics.port }}
{{- end }}

{{/* The API port of the forum, scorer and gateway, as a NetworkPolicy port. */}}
{{- define "aar.apiPolicyPort" -}}
- protocol: TCP
  port: 8080
{{- end }}
