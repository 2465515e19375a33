{{- /*
ShapeBlock: values are data, never templates. Upstream 2.8.1 renders every value through `tpl`,
which would run any string a tenant controls (a config var, a command, a host) as a template with
the install Job's powers: `lookup` reads Secrets, and output can add whole objects.

Here nothing is evaluated. A string is emitted as it is (the chart puts those into scalars it
composes, such as `image: <image>:<tag>`). A list becomes a block sequence and a map a block
mapping, as `toYaml` would make them, but each item or value is written as one line of JSON: a
JSON value is valid YAML on one line, so callers may still `nindent` it or put two lists one
after the other, and no string becomes a block scalar (`toYaml | nindent` corrupts block scalars
with an indentation indicator, e.g. a string that starts with a newline or a space).
*/ -}}
{{- define "helpers.tplvalues.render" -}}
{{- if typeIs "string" .value }}
{{- .value }}
{{- else if kindIs "slice" .value }}
{{- range $i, $item := .value }}{{ if $i }}{{ "\n" }}{{ end }}- {{ toJson $item }}{{ end }}
{{- else if kindIs "map" .value }}
{{- $first := true }}
{{- range $key, $item := .value }}{{ if not $first }}{{ "\n" }}{{ end }}{{ $first = false }}{{ toJson $key }}: {{ toJson $item }}{{ end }}
{{- else }}
{{- toJson .value }}
{{- end }}
{{- end -}}
