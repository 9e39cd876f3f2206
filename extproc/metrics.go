package extproc

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/knhk/knhk/pkg/admission"
	"github.com/knhk/knhk/pkg/canary"
)

// Metrics are the ext_proc decision counters exported at /metrics.
type Metrics struct {
	decisions     [3]prometheus.Counter // indexed by canary.Version
	stripped      prometheus.Counter
	resets        prometheus.Counter
	streamsActive prometheus.Gauge
	streamErrors  *prometheus.CounterVec
	admission     [3][3]prometheus.Counter // [class][verdict]
	receipts      prometheus.Counter
	receiptErrors prometheus.Counter
}

// NewMetrics registers the ext_proc metrics on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	dec := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "knhk_canary_decisions_total",
		Help: "Routing decisions by version; none = no sticky key, Envoy's weighted clusters decided.",
	}, []string{"version"})
	m := &Metrics{
		stripped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "knhk_extproc_stripped_headers_total",
			Help: "Client-supplied x-knhk-* headers removed before any decision.",
		}),
		resets: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "knhk_extproc_unanswered_requests_total",
			Help: "Requests whose stream ended without response headers (resets); counted as failures of their version.",
		}),
		streamsActive: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "knhk_extproc_streams_active",
			Help: "ext_proc streams (HTTP requests) in progress.",
		}),
		streamErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "knhk_extproc_stream_errors_total",
			Help: "ext_proc streams ended with a gRPC error, by code.",
		}, []string{"code"}),
	}
	for _, v := range []canary.Version{canary.None, canary.Stable, canary.Canary} {
		m.decisions[v] = dec.WithLabelValues(v.String())
	}
	adm := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "knhk_admission_decisions_total",
		Help: "Admission decisions by SLO class and reason (admitted, no_room, over_budget).",
	}, []string{"class", "decision"})
	for _, c := range admission.Classes {
		for _, v := range []admission.Verdict{admission.Admit, admission.RejectNoRoom, admission.RejectOverBudget} {
			m.admission[c][v] = adm.WithLabelValues(c.String(), v.Reason())
		}
	}
	m.receipts = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "knhk_receipts_issued_total", Help: "Receipts durably logged and returned in x-knhk-receipt.",
	})
	m.receiptErrors = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "knhk_receipt_errors_total", Help: "Responses sent without a receipt because logging it failed.",
	})
	reg.MustRegister(dec, adm, m.stripped, m.resets, m.streamsActive, m.streamErrors, m.receipts, m.receiptErrors)
	return m
}
