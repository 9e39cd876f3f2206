package harness

// Pid returns the process id of the running `knhk serve` (after a Restart,
// the new one), so a benchmark can read its CPU time from /proc.
func (k *Knhk) Pid() int { return k.cmd.Process.Pid }
