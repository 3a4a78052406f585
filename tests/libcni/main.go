// libcni-run: the CNI suite's client built on libcni, the library containerd and CRI-O call
// CNI through, with cnitool's command line: `libcni-run add|check|del NETWORK NETNS`. The
// conflist is read from CNI_CONF_DIR (NETWORK is its "name"), plugins from CNI_PATH; the
// container id is CNI_CONTAINERID, the interface CNI_IFNAME (eth0), CNI_ARGS as given. libcni
// caches each ADD's result under CNI_CACHE_DIR and hands it to CHECK and DEL as prevResult, as
// a runtime does. Built offline against Debian's golang-github-appc-cni-dev (tests/src/cni.rs).
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
)

func env(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: libcni-run add|check|del NETWORK NETNS")
		os.Exit(2)
	}
	command, network, netns := os.Args[1], os.Args[2], os.Args[3]
	conf, err := libcni.LoadConfList(os.Getenv("CNI_CONF_DIR"), network)
	if err != nil {
		fmt.Fprintln(os.Stderr, "loading the conflist:", err)
		os.Exit(1)
	}
	cni := libcni.NewCNIConfigWithCacheDir(filepath.SplitList(os.Getenv("CNI_PATH")), os.Getenv("CNI_CACHE_DIR"), nil)
	rt := &libcni.RuntimeConf{
		ContainerID: env("CNI_CONTAINERID", "libcni-run"),
		NetNS:       netns,
		IfName:      env("CNI_IFNAME", "eth0"),
	}
	for _, kv := range strings.Split(os.Getenv("CNI_ARGS"), ";") {
		if k, v, ok := strings.Cut(kv, "="); ok {
			rt.Args = append(rt.Args, [2]string{k, v})
		}
	}
	ctx := context.Background()
	switch command {
	case "add":
		result, err := cni.AddNetworkList(ctx, conf, rt)
		if err != nil {
			fmt.Fprintln(os.Stderr, "ADD:", err)
			os.Exit(1)
		}
		out, _ := json.Marshal(result)
		fmt.Println(string(out))
	case "check":
		err = cni.CheckNetworkList(ctx, conf, rt)
	case "del":
		err = cni.DelNetworkList(ctx, conf, rt)
	default:
		err = fmt.Errorf("unknown command %q", command)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", strings.ToUpper(command), err)
		os.Exit(1)
	}
}
