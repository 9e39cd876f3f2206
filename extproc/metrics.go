package extproc

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/knhk/knhk/pkg/admission"
	"github.com/knhk/knhk/pkg/canary"
)

// Metrics are the ext_proc decision counters exported at /metrics.
type Metrics struct {
	decisions       [3]prometheus.Counter // indexed by canary.Version
	stripped        prometheus.Counter
	resets          prometheus.Counter
	streamsActive   prometheus.Gauge
	streamErrors    *prometheus.CounterVec
	admission       [3][3]prometheus.Counter // [class][verdict]
	receipts        prometheus.Counter
	receiptErrors   prometheus.Counter
	receiptRefused  prometheus.Counter
	localReplies    prometheus.Counter
	headerOverflows prometheus.Counter
	mutations       *prometheus.CounterVec
	mutation        [2][2]prometheus.Counter // [response phase][remove]
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
			Help: "Requests whose stream ended without response headers (client resets, Envoy gave up); never counted against a version, since any client can reset.",
		}),
		localReplies: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "knhk_extproc_local_replies_total",
			Help: "Responses Envoy made itself before reaching any upstream (no xds.cluster_name); never counted against a version.",
		}),
		headerOverflows: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "knhk_extproc_header_limit_refusals_total",
			Help: "Requests answered 431 (or responses 502) by knhk because its headers would push them past Envoy's header limits.",
		}),
		mutations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "knhk_extproc_header_mutations_total",
			Help: "Header mutations knhk asked of Envoy, by phase and operation (set, remove).",
		}, []string{"phase", "op"}),
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
		Name: "knhk_receipt_errors_total", Help: "Receipts that could not be logged: the response went without one, or was refused (receipts.required).",
	})
	m.receiptRefused = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "knhk_receipt_refused_total", Help: "Requests answered 503 x-knhk-shed: receipt because no receipt could be logged (receipts.required).",
	})
	for i, ph := range []string{"request", "response"} {
		for j, op := range []string{"set", "remove"} {
			m.mutation[i][j] = m.mutations.WithLabelValues(ph, op)
		}
	}
	reg.MustRegister(dec, adm, m.stripped, m.resets, m.localReplies, m.headerOverflows, m.mutations, m.streamsActive, m.streamErrors, m.receipts, m.receiptErrors, m.receiptRefused)
	return m
}
