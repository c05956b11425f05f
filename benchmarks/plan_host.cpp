// The row engine's planning code (csrc/cuda/plan_rows.h) compiled for the host, for benchmarks/plans.py: one
// query a line on stdin, one plan a line on stdout, so that the plans of the benchmark shapes on GPUs we do
// not have are computed by the code the library runs, not by a copy of it.
//   rows  ROWS N P VMAX MAX_THREADS CLUSTER_THREADS SMS CLUSTERS MAX_OFF
//   columns OUTER N INNER P V VEC SMS CLUSTERS
// ->  PATH V THREADS LANES CLUSTER CHUNKS CHUNK_LEN BLOCKS
#include <iostream>
#include <string>

#include "cuda/plan_rows.h"

int main() {
  using namespace torch_vjp::cuda;
  std::string kind;
  while (std::cin >> kind) {
    Plan p{};
    if (kind == "rows") {
      int64_t rows, n;
      int P, Vmax, max_threads, cluster_threads, sms, clusters, max_off;
      std::cin >> rows >> n >> P >> Vmax >> max_threads >> cluster_threads >> sms >> clusters >> max_off;
      p = plan_rows(rows, n, P, Vmax, max_threads, cluster_threads, sms, clusters != 0, max_off);
    } else if (kind == "columns") {
      int64_t outer, n, inner;
      int P, V, vec, sms, clusters;
      std::cin >> outer >> n >> inner >> P >> V >> vec >> sms >> clusters;
      p = plan_columns(outer, n, inner, P, V, vec != 0, sms, clusters != 0);
    } else {
      std::cerr << "plan_host: unknown query " << kind << "\n";
      return 2;
    }
    std::cout << plan_path(p) << ' ' << p.V << ' ' << p.threads << ' ' << p.lanes << ' ' << p.cluster << ' '
              << p.chunks << ' ' << p.chunk_len << ' ' << p.blocks << '\n';
  }
  return 0;
}
