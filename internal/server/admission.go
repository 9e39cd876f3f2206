package server

import (
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/knhk/knhk/pkg/admission"
	"github.com/knhk/knhk/pkg/canary"
	"github.com/knhk/knhk/pkg/capacity"
)

// admissionCollector exports the limiters' state at scrape time.
type admissionCollector struct{ s *Server }

var (
	descLimit    = prometheus.NewDesc("knhk_admission_limit", "Adaptive concurrency limit per upstream cluster.", []string{"cluster"}, nil)
	descInflight = prometheus.NewDesc("knhk_admission_inflight", "Requests in flight per cluster and SLO class.", []string{"cluster", "class"}, nil)
	descAdmitted = prometheus.NewDesc("knhk_admission_admitted_total", "Requests admitted per cluster and SLO class.", []string{"cluster", "class"}, nil)
	descRejected = prometheus.NewDesc("knhk_admission_rejected_total", "Requests shed per cluster and SLO class.", []string{"cluster", "class"}, nil)
	descLatency  = prometheus.NewDesc("knhk_admission_latency_seconds", "Latency estimate (short window) and no-load baseline per cluster.", []string{"cluster", "kind"}, nil)
	descEstimate = prometheus.NewDesc("knhk_admission_latency_estimate_seconds",
		"Latency estimate per cluster and SLO class that the class's budget is compared with; 0 while unknown.", []string{"cluster", "class"}, nil)
)

func (c *admissionCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descLimit, descInflight, descAdmitted, descRejected, descLatency, descEstimate} {
		ch <- d
	}
}

func (c *admissionCollector) Collect(ch chan<- prometheus.Metric) {
	now := time.Now()
	for _, v := range []canary.Version{canary.Stable, canary.Canary} {
		snap := c.s.limiters[v].Snapshot()
		cl := v.String()
		ch <- prometheus.MustNewConstMetric(descLimit, prometheus.GaugeValue, snap.Limit, cl)
		ch <- prometheus.MustNewConstMetric(descLatency, prometheus.GaugeValue, snap.ShortRTT.Seconds(), cl, "estimate")
		ch <- prometheus.MustNewConstMetric(descLatency, prometheus.GaugeValue, snap.Baseline.Seconds(), cl, "baseline")
		for _, k := range admission.Classes {
			ch <- prometheus.MustNewConstMetric(descInflight, prometheus.GaugeValue, float64(snap.InFlight[k]), cl, k.String())
			ch <- prometheus.MustNewConstMetric(descAdmitted, prometheus.CounterValue, float64(snap.Admitted[k]), cl, k.String())
			ch <- prometheus.MustNewConstMetric(descRejected, prometheus.CounterValue, float64(snap.Rejected[k]), cl, k.String())
			ch <- prometheus.MustNewConstMetric(descEstimate, prometheus.GaugeValue, c.s.limiters[v].Estimate(k, now).Seconds(), cl, k.String())
		}
	}
}

// AdmissionView is GET /v1/admission.
type AdmissionView struct {
	Enabled  bool                     `json:"enabled"`
	Clusters map[string]ClusterLimits `json:"clusters"`
}

// ClusterLimits is one upstream cluster's limiter.
type ClusterLimits struct {
	Limit      float64                `json:"limit"`
	EstimateMs float64                `json:"latency_estimate_ms"`
	BaselineMs float64                `json:"latency_baseline_ms"`
	Classes    map[string]ClassLimits `json:"classes"`
}

// ClassLimits is one class within a cluster.
type ClassLimits struct {
	BudgetMs   float64 `json:"budget_ms"`
	EstimateMs float64 `json:"latency_estimate_ms"` // this class's own; 0 while unknown
	Guaranteed float64 `json:"guaranteed"`
	InFlight   int     `json:"inflight"`
	Admitted   uint64  `json:"admitted"`
	Rejected   uint64  `json:"rejected"`
}

func (s *Server) handleAdmission(w http.ResponseWriter, _ *http.Request) {
	cfg := s.config()
	lc := cfg.Admission.LimiterConfig()
	v := AdmissionView{Enabled: cfg.Admission.Enabled, Clusters: map[string]ClusterLimits{}}
	now := time.Now()
	for _, ver := range []canary.Version{canary.Stable, canary.Canary} {
		snap := s.limiters[ver].Snapshot()
		cl := ClusterLimits{Limit: snap.Limit, EstimateMs: ms(snap.ShortRTT), BaselineMs: ms(snap.Baseline), Classes: map[string]ClassLimits{}}
		for _, k := range admission.Classes {
			cl.Classes[k.String()] = ClassLimits{BudgetMs: ms(lc.Budgets[k]), EstimateMs: ms(s.limiters[ver].Estimate(k, now)), Guaranteed: snap.Guaranteed[k],
				InFlight: snap.InFlight[k], Admitted: snap.Admitted[k], Rejected: snap.Rejected[k]}
		}
		v.Clusters[ver.String()] = cl
	}
	writeJSON(w, http.StatusOK, v)
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func (s *Server) handleCapacity(w http.ResponseWriter, _ *http.Request) {
	cfg := s.config()
	replicas := len(cfg.Upstreams.Stable)
	r := s.tracker.Report(time.Now(), s.limiters[canary.Stable].Snapshot().Limit, replicas)
	writeJSON(w, http.StatusOK, struct {
		capacity.Report
		Key string `json:"key"`
	}{r, cfg.Capacity.Key})
}
