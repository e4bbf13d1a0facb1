// criclient: a generic CRI client built on grpc-go, the gRPC stack the kubelet and crictl use.
//
// It needs no generated protobuf Go code: the request is the serialized protobuf message read from stdin,
// and each response message is written as base64, so the Python tests build and parse the messages with
// their own stubs. The point is the transport: grpc-go's HTTP/2 client (flow control, pings, stream
// multiplexing, deadlines, cancellation, status trailers) against the daemon's server.
//
// Output, one JSON object per line on stdout:
//
//	{"message": "<base64>"}                 one per response message, in order (per call with -concurrency)
//	{"code": "OK", "message": "..."}        the final status of each call (status.FromError)
//
// SIGINT or SIGTERM cancels the calls in flight; they are reported with the code Canceled.
//
// The exit status is 0 when the calls ran, whatever their gRPC codes; non-zero only for harness failures
// (bad flags, unreadable stdin, a connection that cannot be set up).
//
// Builds in GOPATH mode against Debian's packaged sources (golang-google-grpc-dev):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o criclient tests/goclient/main.go
package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/status"
)

// The kubelet's message size limit (k8s.io/cri-client: maxMsgSize = 16 MiB), in both directions.
const maxMsgSize = 16 * 1024 * 1024

// rawCodec passes already-serialized protobuf bytes through untouched. Its name is "proto" so the
// content-type on the wire is application/grpc+proto, as with generated stubs.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) {
	switch m := v.(type) {
	case []byte:
		return m, nil
	case *[]byte:
		return *m, nil
	}
	return nil, fmt.Errorf("rawCodec: cannot marshal %T", v)
}

func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	m, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("rawCodec: cannot unmarshal into %T", v)
	}
	*m = append((*m)[:0], data...)
	return nil
}

func (rawCodec) Name() string { return "proto" }

var _ encoding.Codec = rawCodec{}

type output struct {
	mu  sync.Mutex
	enc *json.Encoder
}

func (o *output) write(v interface{}) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if err := o.enc.Encode(v); err != nil {
		fmt.Fprintf(os.Stderr, "criclient: writing stdout: %v\n", err)
		os.Exit(3)
	}
}

type messageLine struct {
	Message string `json:"message"`
}

type statusLine struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

func statusOf(err error) statusLine {
	if err == nil {
		return statusLine{Code: codes.OK.String()}
	}
	s, ok := status.FromError(err)
	if !ok {
		// Not a gRPC status (should not happen for errors returned by grpc-go): report it as Unknown.
		return statusLine{Code: codes.Unknown.String(), Message: err.Error()}
	}
	return statusLine{Code: s.Code().String(), Message: s.Message()}
}

// unary runs one call; the response line (if any) and the status line are written together, so concurrent
// calls never interleave a message with another call's status.
func unary(ctx context.Context, conn *grpc.ClientConn, method string, request []byte, out *output) {
	var response []byte
	err := conn.Invoke(ctx, method, request, &response)
	out.mu.Lock()
	defer out.mu.Unlock()
	if err == nil {
		_ = out.enc.Encode(messageLine{Message: base64.StdEncoding.EncodeToString(response)})
	}
	if e := out.enc.Encode(statusOf(err)); e != nil {
		fmt.Fprintf(os.Stderr, "criclient: writing stdout: %v\n", e)
		os.Exit(3)
	}
}

// serverStream sends the request and writes every message until the stream ends, fails, or maxMessages
// arrived (then the stream is cancelled, and the status reported is OK: the client chose to stop).
func serverStream(ctx context.Context, conn *grpc.ClientConn, method string, request []byte, maxMessages int, out *output) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	desc := &grpc.StreamDesc{StreamName: method, ServerStreams: true}
	stream, err := conn.NewStream(ctx, desc, method)
	if err == nil {
		err = stream.SendMsg(request)
	}
	if err == nil {
		err = stream.CloseSend()
	}
	received := 0
	stopped := false
	for err == nil {
		if maxMessages > 0 && received >= maxMessages {
			cancel()
			stopped = true
			break
		}
		var message []byte
		if err = stream.RecvMsg(&message); err == nil {
			received++
			out.write(messageLine{Message: base64.StdEncoding.EncodeToString(message)})
		}
	}
	if err == io.EOF {
		err = nil
	}
	line := statusOf(err)
	if stopped {
		line.Message = fmt.Sprintf("cancelled by the client after %d messages", received)
	}
	out.write(line)
}

func socketTarget(socket string) string {
	if strings.HasPrefix(socket, "unix://") {
		return socket
	}
	return "unix://" + socket
}

func main() {
	socket := flag.String("socket", "", "the daemon's unix socket (a path or unix:///path)")
	method := flag.String("method", "", "full method name, e.g. /runtime.v1.RuntimeService/Version")
	stream := flag.Bool("stream", false, "the method is server-streaming")
	timeout := flag.Duration("timeout", 5*time.Second, "deadline of each call (0: none)")
	maxMessages := flag.Int("max-messages", 0, "stop a stream after this many messages by cancelling it (0: read to the end)")
	concurrency := flag.Int("concurrency", 1, "issue the same unary call this many times at once on one connection")
	flag.Parse()
	if *socket == "" || !strings.HasPrefix(*method, "/") || *concurrency < 1 {
		fmt.Fprintln(os.Stderr, "usage: criclient -socket PATH -method /pkg.Service/Method [-stream] [-timeout D] [-max-messages N] [-concurrency N] < request.bin")
		os.Exit(2)
	}
	request, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintf(os.Stderr, "criclient: reading the request from stdin: %v\n", err)
		os.Exit(2)
	}

	// Like crictl and the kubelet: plaintext HTTP/2 on the unix socket, the kubelet's message limits.
	// (grpc.WithInsecure: Debian 12's grpc-go 1.33 predates credentials/insecure.)
	dialCtx, dialCancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer dialCancel()
	conn, err := grpc.DialContext(dialCtx, socketTarget(*socket),
		grpc.WithInsecure(),
		grpc.WithBlock(),
		grpc.WithDefaultCallOptions(
			grpc.ForceCodec(rawCodec{}),
			grpc.MaxCallRecvMsgSize(maxMsgSize),
			grpc.MaxCallSendMsgSize(maxMsgSize),
		),
	)
	if err != nil {
		fmt.Fprintf(os.Stderr, "criclient: connecting to %s: %v\n", *socket, err)
		os.Exit(1)
	}
	defer conn.Close()

	// SIGINT or SIGTERM cancels the calls (RST_STREAM CANCEL), as a kubelet does when it gives up on a call:
	// they end with the status Canceled, which is printed like any other.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-signals
		cancel()
	}()
	if *timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *timeout)
		defer cancel()
	}
	out := &output{enc: json.NewEncoder(os.Stdout)}
	if *stream {
		serverStream(ctx, conn, *method, request, *maxMessages, out)
		return
	}
	var wg sync.WaitGroup
	for i := 0; i < *concurrency; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			unary(ctx, conn, *method, request, out)
		}()
	}
	wg.Wait()
}
