# Runs `wsbridge-bench --quick` and checks that it wrote well-formed JSON with every
# section. Figures are not checked: speed goals belong to the benchmark, not to tests.
file(REMOVE ${OUT})
execute_process(COMMAND ${BENCH} --quick --json ${OUT} RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "wsbridge-bench --quick exited with ${rc}")
endif()
file(READ ${OUT} text)
string(JSON tool ERROR_VARIABLE err GET "${text}" tool)
if(err OR NOT tool STREQUAL "wsbridge-bench")
  message(FATAL_ERROR "bad JSON from wsbridge-bench: ${err}")
endif()
string(JSON nruns LENGTH "${text}" runs)
if(NOT nruns EQUAL 2)
  message(FATAL_ERROR "expected a TLS and a plaintext run, got ${nruns}")
endif()
foreach(path "runs;0;round_trip;bridged_call;p50_us" "runs;0;round_trip;ws_direct;p99_us"
             "runs;0;nlx;bridged_send;p50_us" "runs;0;nlx;memory;rss_kib_per_conversation"
             "runs;0;fanout;0;max_sustained_deliveries_per_s" "runs;0;dfx;chunks_per_s"
             "runs;0;sessions;levels;0;rss_kib_per_session" "runs;0;allocations;bridged_call;allocs_per_message"
             "runs;1;round_trip;bridged_call;p50_us" "machine;cpu_model"
             "runs;0;nexora;bridged;first_chunk;p50_us" "runs;0;nexora;ws_direct;chunks_per_s"
             "runs;0;emogg;round_trip;bridged_request;p50_us" "runs;0;emogg;fanout;levels;1;deliveries_per_s"
             "runs;0;throughput;levels;1;bridged;calls_per_s" "runs;0;throughput;levels;1;cpu_ratio_wsbridged_over_direct"
             "runs;0;throughput;open_loop;0;achieved_per_s")
  string(REPLACE ";" " " shown "${path}")
  string(JSON v ERROR_VARIABLE err GET "${text}" ${path})
  if(err)
    message(FATAL_ERROR "bench JSON lacks ${shown}: ${err}")
  endif()
  message(STATUS "${shown} = ${v}")
endforeach()
