package promotion

import (
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

var (
	bucketRollout = []byte("rollout")
	keyState      = []byte("state")
)

// BoltStore keeps the rollout state in a bbolt file: each Save is one
// fsynced transaction, so a crash leaves either the old or the new state.
type BoltStore struct {
	db *bolt.DB
}

// OpenBoltStore opens (or creates, mode 0600) dir/state.db.
func OpenBoltStore(dir string) (*BoltStore, error) {
	path := filepath.Join(dir, "state.db")
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	switch {
	case errors.Is(err, bolterrors.ErrTimeout):
		// The file lock is held: only then is another process the likely cause.
		return nil, fmt.Errorf("%s is locked: is another knhk using this data_dir?", path)
	case err != nil:
		return nil, err // an *fs.PathError already names the file
	}
	return &BoltStore{db: db}, nil
}

// Load returns the saved state, if any.
func (s *BoltStore) Load() (State, bool, error) {
	var st State
	found := false
	err := s.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketRollout)
		if b == nil {
			return nil
		}
		raw := b.Get(keyState)
		if raw == nil {
			return nil
		}
		found = true
		return json.Unmarshal(raw, &st)
	})
	if err != nil {
		return State{}, false, fmt.Errorf("%s: %w", s.db.Path(), err)
	}
	return st, found, nil
}

// Save writes the state durably.
func (s *BoltStore) Save(st State) error {
	raw, err := json.Marshal(st)
	if err != nil {
		return err
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bucketRollout)
		if err != nil {
			return err
		}
		return b.Put(keyState, raw)
	})
}

// Close closes the file.
func (s *BoltStore) Close() error { return s.db.Close() }
