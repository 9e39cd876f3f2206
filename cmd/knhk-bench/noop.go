package main

import (
	"errors"
	"io"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
)

// noop is an ext_proc server that answers every message with "continue" and
// no mutation: the floor any Go ext_proc server pays, which `make bench`
// compares knhk with.
type noop struct {
	extprocv3.UnimplementedExternalProcessorServer
}

var (
	noopRequest  = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestHeaders{RequestHeaders: &extprocv3.HeadersResponse{}}}
	noopResponse = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{ResponseHeaders: &extprocv3.HeadersResponse{}}}
)

// Process answers request and response headers with empty responses.
func (noop) Process(srv extprocv3.ExternalProcessor_ProcessServer) error {
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
