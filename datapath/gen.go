package datapath

// Run through `make generate`: it builds in one fixed directory, since clang orders some
// BTF types by the directory it builds in, and generate-check compares with the committed
// objects byte for byte.

//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror" -target bpfel -type svc_key -type svc_value -type slot_key -type backend -type svc_name -type lb_entry -type sock_state -type pod_ref -type pod_meta -type pod_svc_key -type aff_value -type datapath_cfg -type svc_netns_key -type svc_netns_counts -type svc_flags -type sock_state_flags -type pod_flags -type cfg_flags -type stat_index -type client_id -type lb_decision -type trace_cfg -type trace_op -type trace_verdict -type trace_filter_flags -type svc_counters socklb ../bpf/socklb.c -- -I../bpf/include -I../bpf
//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror" -target bpfel -type sock_record -type list_filter -type svc_backend_key -type doomed_value -type rec_flags -type filter_flags -type destroy_count sockiter ../bpf/sockiter.c -- -I../bpf/include -I../bpf
//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror" -target bpfel mapcount ../bpf/mapcount.c -- -I../bpf/include -I../bpf
