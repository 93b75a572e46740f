//go:build vtprotobuf

package main

import extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"

// marshal with the generated code go-control-plane ships behind this tag (no reflection).
func marshal(r *extprocv3.ProcessingResponse) ([]byte, error) { return r.MarshalVTStrict() }
