package server

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/knhk/knhk/pkg/promotion"
)

type metrics struct {
	weight    prometheus.Gauge
	phase     *prometheus.GaugeVec
	decisions *prometheus.CounterVec
	reloads   *prometheus.CounterVec
	webhooks  *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) metrics {
	m := metrics{
		weight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "knhk_rollout_weight", Help: "Current canary weight in percent (drives both the hash split and Envoy's weighted clusters).",
		}),
		phase: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "knhk_rollout_phase", Help: "1 for the rollout's current phase, 0 for the others.",
		}, []string{"phase"}),
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "knhk_rollout_decisions_total", Help: "Rollout decisions by decision and reason (the check that decided).",
		}, []string{"decision", "reason"}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "knhk_config_reloads_total", Help: "Config reloads (SIGHUP) by result.",
		}, []string{"result"}),
		webhooks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "knhk_rollout_webhooks_total", Help: "Webhook deliveries by result (ok, failed after retries, dropped).",
		}, []string{"result"}),
	}
	reg.MustRegister(m.weight, m.phase, m.decisions, m.reloads, m.webhooks)
	return m
}

func (m metrics) setPhase(current promotion.Phase) {
	for _, p := range promotion.Phases {
		v := 0.0
		if p == current {
			v = 1
		}
		m.phase.WithLabelValues(string(p)).Set(v)
	}
}
