package extproc

import (
	"errors"
	"io"
	"runtime"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
)

// Noop is an ext_proc server that answers every message with "continue" and
// no mutation: the floor any Go ext_proc server pays, which `make bench`
// compares knhk with.
type Noop struct {
	extprocv3.UnimplementedExternalProcessorServer
}

var (
	noopRequest  = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestHeaders{RequestHeaders: &extprocv3.HeadersResponse{}}}
	noopResponse = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{ResponseHeaders: &extprocv3.HeadersResponse{}}}
)

// Process answers request and response headers with empty responses.
func (Noop) Process(srv extprocv3.ExternalProcessor_ProcessServer) error {
	for {
		req, err := srv.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		resp := noopRequest
		if req.GetResponseHeaders() != nil {
			resp = noopResponse
		}
		if err := srv.Send(resp); err != nil {
			return err
		}
	}
}

// RegisterNoop registers a Noop server on a gRPC server.
func RegisterNoop(s interface {
	RegisterService(*grpc.ServiceDesc, any)
}) {
	s.RegisterService(&extprocv3.ExternalProcessor_ServiceDesc, Noop{})
}

// GRPCServerOptions are the gRPC server settings for ext_proc listeners.
// One stream per HTTP request makes goroutine creation per stream a real
// cost, so streams are served by a fixed pool of workers, one per CPU.
func GRPCServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{grpc.NumStreamWorkers(uint32(runtime.GOMAXPROCS(0)))}
}
