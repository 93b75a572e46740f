// bkv-noise-processor: the Noise edge's gRPC processor for Envoy's HTTP
// ext_proc filter (docs/edge.md). Compiled because the processor sees every
// request and a Python one cost ~1.4 ms of CPU per request, most of it
// gRPC machinery (docs/performance.md, "Optimisation log").
//
//	bkv-noise-processor serve --listen 127.0.0.1:9002 --key-file edge.key [--metrics-listen HOST:PORT]
//	bkv-noise-processor floor [--iterations N]     the responder's Noise cryptography in a tight loop (JSON)
package main

import (
	"bytes"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const processMethod = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"

// rawCodec hands the stream raw protobuf bytes both ways (extproc.go decodes
// and encodes them, so that a message that does not parse gets a refusal).
type rawCodec struct{}

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	return mem.BufferSlice{mem.SliceBuffer(v.([]byte))}, nil
}
func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	*(v.(*[]byte)) = data.Materialize() // a copy: gRPC frees data on return
	return nil
}
func (rawCodec) Name() string { return "proto" }

func (p *processor) handle(_ any, stream grpc.ServerStream) error {
	if method, _ := grpc.MethodFromServerStream(stream); method != processMethod {
		return status.Error(codes.Unimplemented, "only "+processMethod+" is served")
	}
	route := ""
	if md, ok := metadata.FromIncomingContext(stream.Context()); ok {
		if v := md.Get(routeMetadata); len(v) > 0 {
			route = v[0]
		}
	}
	x := &exchange{p: p, route: route}
	for {
		var raw []byte
		if err := stream.RecvMsg(&raw); err != nil {
			if err == io.EOF {
				return nil
			}
			return err
		}
		var answer []byte
		done := false
		if ph, err := decodeRequest(raw); err != nil {
			answer, done = p.refuse(errBadMessage(err.Error())), true
		} else {
			answer, done = x.on(ph)
		}
		if err := stream.SendMsg(answer); err != nil {
			return err
		}
		if done {
			return nil
		}
	}
}

func loadKey(path string) (staticKey, error) {
	text, err := os.ReadFile(path)
	if err != nil {
		return staticKey{}, err
	}
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(text)))
	if err != nil || len(raw) != 32 {
		return staticKey{}, fmt.Errorf("%s: not an X25519 key", path)
	}
	return newStaticKey(raw)
}

func serve(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:9002", "host:port of the gRPC processor")
	metricsListen := fs.String("metrics-listen", "", "host:port of a Prometheus /metrics endpoint (off if empty)")
	defaultKey := os.Getenv("BKV_EDGE_KEY_FILE")
	if defaultKey == "" {
		defaultKey = "edge.key"
	}
	keyFile := fs.String("key-file", defaultKey, "the edge's static key (bkv-edge keygen)")
	maxSessions := fs.Int("max-sessions", 100000, "sessions kept; the oldest goes first")
	ttl := fs.Duration("session-ttl", time.Hour, "a session's lifetime")
	_ = fs.Parse(args)

	key, err := loadKey(*keyFile)
	if err != nil {
		return err
	}
	p := &processor{key: key, sessions: newSessions(*maxSessions, *ttl), metrics: &metrics{}}
	lis, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("cannot listen on %s: %w", *listen, err)
	}
	if *metricsListen != "" {
		mlis, err := net.Listen("tcp", *metricsListen)
		if err != nil {
			return fmt.Errorf("cannot listen on %s: %w", *metricsListen, err)
		}
		mux := http.NewServeMux()
		mux.HandleFunc("/metrics", func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
			_, _ = w.Write(p.metrics.exposition(p.sessions.len()))
		})
		metricsServer := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() { log.Print(metricsServer.Serve(mlis)) }()
	}
	server := grpc.NewServer(grpc.ForceServerCodecV2(rawCodec{}), grpc.UnknownServiceHandler(p.handle))
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-stop
		// Let the requests in flight finish (Envoy fails closed without us), but not forever.
		time.AfterFunc(5*time.Second, server.Stop)
		server.GracefulStop()
	}()
	log.Printf("noise processor on %s", lis.Addr())
	return server.Serve(lis)
}

func main() {
	log.SetFlags(0)
	log.SetPrefix("bkv-noise-processor: ")
	if os.Getenv("GOMAXPROCS") == "" {
		// One thread runs Go code: a core serves thousands of requests a second,
		// and waking a second thread per message cost more CPU than it saved
		// (docs/performance.md). Go >= 1.25 sees a pod's CPU limit, but never
		// goes below 2 from it, and without a limit it takes every core.
		runtime.GOMAXPROCS(1)
	}
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: bkv-noise-processor serve|floor [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "floor":
		err = floor(os.Args[2:], os.Stdout)
	default:
		err = errors.New("unknown command " + os.Args[1] + "; want serve or floor")
	}
	if err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		log.Print(err)
		os.Exit(1)
	}
}

// metrics: two counters and a gauge, in Prometheus' text format.
type metrics struct {
	mu         sync.Mutex
	handshakes uint64
	rejections map[string]uint64
}

func (m *metrics) handshake() {
	m.mu.Lock()
	m.handshakes++
	m.mu.Unlock()
}

func (m *metrics) rejected(reason string) {
	m.mu.Lock()
	if m.rejections == nil {
		m.rejections = map[string]uint64{}
	}
	m.rejections[reason]++
	m.mu.Unlock()
}

func (m *metrics) exposition(sessions int) []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	var b bytes.Buffer
	b.WriteString("# HELP bkv_noise_handshakes_total Noise handshakes completed at the edge\n")
	b.WriteString("# TYPE bkv_noise_handshakes_total counter\n")
	fmt.Fprintf(&b, "bkv_noise_handshakes_total %d\n", m.handshakes)
	b.WriteString("# HELP bkv_noise_rejections_total Noise messages refused, by reason\n")
	b.WriteString("# TYPE bkv_noise_rejections_total counter\n")
	for _, reason := range sortedKeys(m.rejections) {
		fmt.Fprintf(&b, "bkv_noise_rejections_total{reason=%q} %d\n", reason, m.rejections[reason])
	}
	b.WriteString("# HELP bkv_noise_sessions Noise sessions held by the processor\n")
	b.WriteString("# TYPE bkv_noise_sessions gauge\n")
	fmt.Fprintf(&b, "bkv_noise_sessions %d\n", sessions)
	return b.Bytes()
}

func sortedKeys(m map[string]uint64) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
