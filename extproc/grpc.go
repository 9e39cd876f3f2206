package extproc

import (
	"runtime"

	"google.golang.org/grpc"
)

// GRPCServerOptions are the gRPC server settings for ext_proc listeners.
// One stream per HTTP request makes goroutine creation per stream a real
// cost, so streams are served by a fixed pool of workers, one per CPU.
func GRPCServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{grpc.NumStreamWorkers(uint32(runtime.GOMAXPROCS(0)))}
}
