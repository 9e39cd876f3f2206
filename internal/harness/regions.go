package harness

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/knhk/knhk/pkg/config"
)

// Region is one knhk process of a multi-region setup: the first runs
// behind Envoy (a Stack, for traffic); the others stand alone.
type Region struct {
	Name, IP   string
	Config     config.Config
	Knhk       *Knhk
	Stack      *Stack // the first region's
	LogKey     string // its published checkpoint verifier key
	WitnessKey string
	MirrorKey  string
}

// RegionsOptions configure StartRegions.
type RegionsOptions struct {
	BinDir, Dir string
	Logs        io.Writer
	// Names and IPs of the regions (loopback addresses, e.g. 127.0.0.2).
	Names, IPs []string
	Quorum     int
	// Configure edits each region's config before its first start.
	Configure func(*config.Config)
}

// Regions run, each peer reached through its own Toxiproxy proxy per
// direction, so a test can cut any link both ways.
type Regions struct {
	List []*Region
	Toxi *Toxiproxy
}

// Link names the proxy from one region to another.
func Link(from, to *Region) string { return from.Name + "-to-" + to.Name }

// StartRegions mints every region's keys with a first start alone, then
// starts them all, each pinning the others' log, witness and mirror keys.
func StartRegions(o RegionsOptions) (_ *Regions, err error) {
	rs := &Regions{}
	defer func() {
		if err != nil {
			rs.Close()
		}
	}()
	for i, name := range o.Names {
		r := &Region{Name: name, IP: o.IPs[i]}
		if r.Config, err = regionConfig(o, name, r.IP); err != nil {
			return nil, err
		}
		if err := r.bootstrap(o); err != nil {
			return nil, err
		}
		rs.List = append(rs.List, r)
	}
	if rs.Toxi, err = StartToxiproxy(o.Logs); err != nil {
		return nil, err
	}
	ports, err := FreePorts(len(rs.List) * (len(rs.List) - 1))
	if err != nil {
		return nil, err
	}
	for _, from := range rs.List {
		for _, to := range rs.List {
			if from == to {
				continue
			}
			listen := "127.0.0.1:" + strconv.Itoa(ports[0])
			ports = ports[1:]
			if err := rs.Toxi.Proxy(Link(from, to), listen, to.Config.Listen.Region); err != nil {
				return nil, err
			}
			from.Config.Region.Peers = append(from.Config.Region.Peers, config.RegionPeer{
				Name: to.Name, URL: "http://" + listen, WitnessKey: to.WitnessKey, LogKeys: []string{to.LogKey}, MirrorKey: to.MirrorKey,
			})
		}
		from.Config.Region.Quorum = o.Quorum
	}
	for _, r := range rs.List[1:] {
		dir := filepath.Join(o.Dir, r.Name)
		if r.Knhk, err = StartKnhk(filepath.Join(o.BinDir, "knhk"), dir, r.Config, o.Logs, nil); err != nil {
			return nil, err
		}
		if err := r.Knhk.WaitReady(30 * time.Second); err != nil {
			return nil, fmt.Errorf("%s: %w", r.Name, err)
		}
	}
	first := rs.List[0]
	first.Stack, err = StartStack(StackOptions{BinDir: o.BinDir, Dir: filepath.Join(o.Dir, first.Name+"-stack"), Logs: o.Logs, Configure: func(c *config.Config) {
		c.DataDir, c.Receipts, c.Region, c.Listen.Region = first.Config.DataDir, first.Config.Receipts, first.Config.Region, first.Config.Listen.Region
		c.Envoy.MessageTimeout = first.Config.Envoy.MessageTimeout
	}})
	if err != nil {
		return nil, err
	}
	first.Knhk = first.Stack.Knhk
	return rs, nil
}

// SetLinks cuts (on false) or restores the links between r and others,
// both ways.
func (rs *Regions) SetLinks(r *Region, on bool, others ...*Region) error {
	for _, o := range others {
		for _, name := range []string{Link(r, o), Link(o, r)} {
			if err := rs.Toxi.SetEnabled(name, on); err != nil {
				return err
			}
		}
	}
	return nil
}

// Close stops every process.
func (rs *Regions) Close() {
	for _, r := range rs.List {
		switch {
		case r.Stack != nil:
			_ = r.Stack.Close()
		case r.Knhk != nil:
			_ = r.Knhk.Stop(10 * time.Second)
		}
	}
	if rs.Toxi != nil {
		rs.Toxi.Close()
	}
}

// regionConfig is a standalone knhk on ip with receipts and listen.region.
func regionConfig(o RegionsOptions, name, ip string) (config.Config, error) {
	ports, err := FreePorts(4)
	if err != nil {
		return config.Config{}, err
	}
	c := config.Default()
	c.Listen.GRPC = ip + ":" + strconv.Itoa(ports[0])
	c.Listen.Admin = ip + ":" + strconv.Itoa(ports[1])
	c.Listen.XDS = ip + ":" + strconv.Itoa(ports[2])
	c.Listen.Region = ip + ":" + strconv.Itoa(ports[3])
	c.DataDir = filepath.Join(o.Dir, name, "data")
	c.Upstreams.Stable, c.Upstreams.Canary = []string{"127.0.0.1:1"}, []string{"127.0.0.1:2"}
	c.Receipts.Enabled = true
	c.Receipts.Origin = "knhk/" + name
	c.Receipts.CheckpointInterval = config.Duration(500 * time.Millisecond)
	c.Region = config.Region{Name: name}
	if o.Configure != nil {
		o.Configure(&c)
	}
	return c, nil
}

// bootstrap starts a region once with no peers, which mints its log,
// witness and mirror keys, and reads them from GET /v1/keys.
func (r *Region) bootstrap(o RegionsOptions) error {
	dir := filepath.Join(o.Dir, r.Name, "bootstrap")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	k, err := StartKnhk(filepath.Join(o.BinDir, "knhk"), dir, r.Config, o.Logs, nil)
	if err != nil {
		return err
	}
	defer func() { _ = k.Stop(10 * time.Second) }()
	if err := k.WaitReady(30 * time.Second); err != nil {
		return fmt.Errorf("%s: %w", r.Name, err)
	}
	b, err := k.Get("/v1/keys")
	if err != nil {
		return err
	}
	var keys struct {
		Log     string `json:"log_verifier_key"`
		Witness string `json:"witness_verifier_key"`
		Mirror  string `json:"mirror_verifier_key"`
	}
	if err := json.Unmarshal(b, &keys); err != nil {
		return fmt.Errorf("%s: /v1/keys %s: %w", r.Name, b, err)
	}
	if keys.Log == "" || keys.Witness == "" || keys.Mirror == "" {
		return fmt.Errorf("%s: /v1/keys lacks a key: %s", r.Name, b)
	}
	r.LogKey, r.WitnessKey, r.MirrorKey = keys.Log, keys.Witness, keys.Mirror
	return nil
}
