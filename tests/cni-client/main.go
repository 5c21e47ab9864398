// cni-client drives one CNI operation on a network configuration list through libcni, the
// library container runtimes use, so the tests see our plugin exactly as a runtime would
// (config injection, prevResult, result caching and version checks are libcni's).
//
// Usage: cni-client ADD|CHECK|DEL CONFLIST NETNS CONTAINER-ID IFNAME
//
// CNI_PATH (':'-separated) names the plugin directories and CNI_CACHE_DIR libcni's cache.
// CNI_PORT_MAPPINGS, if set, is the JSON of the portMappings capability argument. ADD
// prints the result as JSON on stdout; a failure prints the error on stderr and exits 1.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"github.com/containernetworking/cni/libcni"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) != 5 {
		return fmt.Errorf("usage: cni-client ADD|CHECK|DEL CONFLIST NETNS CONTAINER-ID IFNAME")
	}
	op, confPath, netns, id, ifname := args[0], args[1], args[2], args[3], args[4]
	list, err := libcni.ConfListFromFile(confPath)
	if err != nil {
		return fmt.Errorf("loading %s: %w", confPath, err)
	}
	rt := &libcni.RuntimeConf{ContainerID: id, NetNS: netns, IfName: ifname}
	if pm := os.Getenv("CNI_PORT_MAPPINGS"); pm != "" {
		var mappings []map[string]interface{}
		if err := json.Unmarshal([]byte(pm), &mappings); err != nil {
			return fmt.Errorf("CNI_PORT_MAPPINGS: %w", err)
		}
		rt.CapabilityArgs = map[string]interface{}{"portMappings": mappings}
	}
	cni := libcni.NewCNIConfigWithCacheDir(
		filepath.SplitList(os.Getenv("CNI_PATH")), os.Getenv("CNI_CACHE_DIR"), nil)
	ctx := context.Background()
	switch op {
	case "ADD":
		res, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			return fmt.Errorf("ADD: %w", err)
		}
		return res.Print()
	case "CHECK":
		if err := cni.CheckNetworkList(ctx, list, rt); err != nil {
			return fmt.Errorf("CHECK: %w", err)
		}
	case "DEL":
		if err := cni.DelNetworkList(ctx, list, rt); err != nil {
			return fmt.Errorf("DEL: %w", err)
		}
	default:
		return fmt.Errorf("unknown operation %q", op)
	}
	return nil
}
