-- wrk script for scripts/bench-heartbeat.sh: POSTs agent heartbeats, rotating through enrolled agent credentials.
--
--   wrk -t2 -c64 -d20s -s bench/heartbeat.lua http://127.0.0.1:PORT -- CREDENTIALS_FILE THREADS
--
-- CREDENTIALS_FILE has one "hostname credential" pair per line. Thread n (0-based) takes lines n, n+THREADS, ...,
-- so no two threads share an agent. wrk has no per-connection hook, so each thread rotates through its agents one
-- request at a time: with as many agents as connections, every agent has about one request in flight, and each
-- agent's seq increases by one per heartbeat it sends.
--
-- done() prints one machine-readable line starting with "BENCH " (latencies in milliseconds).

local next_id = 0

function setup(thread)
   thread:set("id", next_id)
   next_id = next_id + 1
end

function init(args)
   local file, nthreads = args[1], tonumber(args[2])
   if file == nil or nthreads == nil then
      error("usage: wrk ... -s heartbeat.lua URL -- CREDENTIALS_FILE THREADS")
   end
   agents = {}
   local line_no = 0
   for line in io.lines(file) do
      local hostname, credential = line:match("^(%S+)%s+(%S+)$")
      if hostname then
         if line_no % nthreads == id then
            table.insert(agents, { hostname = hostname, auth = "Bearer " .. credential, seq = 0 })
         end
         line_no = line_no + 1
      end
   end
   if #agents == 0 then
      error("no credentials for thread " .. id .. " in " .. file)
   end
   cursor = 0
end

function request()
   cursor = cursor % #agents + 1
   local agent = agents[cursor]
   agent.seq = agent.seq + 1
   local body = string.format(
      '{"hostname":"%s","os":"linux","arch":"amd64","version":"bench","commit":"bench","seq":%d}',
      agent.hostname, agent.seq)
   return wrk.format("POST", "/api/v1/agents/heartbeat",
      { ["Authorization"] = agent.auth, ["Content-Type"] = "application/json" }, body)
end

function done(summary, latency, requests)
   local seconds = summary.duration / 1e6
   local e = summary.errors
   io.write(string.format(
      "BENCH requests=%d duration_s=%.2f rps=%.0f p50_ms=%.2f p90_ms=%.2f p99_ms=%.2f max_ms=%.2f " ..
      "status_errors=%d connect_errors=%d read_errors=%d write_errors=%d timeouts=%d\n",
      summary.requests, seconds, summary.requests / seconds,
      latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
      latency.max / 1000,
      e.status, e.connect, e.read, e.write, e.timeout))
end
