-- wrk script for scripts/bench-reports.sh: POSTs operation report batches, rotating through enrolled agent credentials.
--
--   wrk -t2 -c64 -d20s -s bench/reports.lua http://127.0.0.1:PORT -- CREDENTIALS_FILE THREADS BATCH
--
-- CREDENTIALS_FILE has one "hostname credential" pair per line; thread n (0-based) takes lines n, n+THREADS, ...
-- Every request is a batch of BATCH new, final (success) backup reports of plan "bench", each with its own operation
-- id (op_ + thread + counter, 32 hex), so each report is a real insert plus a plan-status update, as an agent's
-- finished runs are.
--
-- done() prints one machine-readable line starting with "BENCH " (latencies in milliseconds).

local next_id = 0

function setup(thread)
   thread:set("id", next_id)
   next_id = next_id + 1
end

function init(args)
   local file, nthreads = args[1], tonumber(args[2])
   batch = tonumber(args[3] or "1")
   if file == nil or nthreads == nil or batch == nil then
      error("usage: wrk ... -s reports.lua URL -- CREDENTIALS_FILE THREADS BATCH")
   end
   agents = {}
   local line_no = 0
   for line in io.lines(file) do
      local hostname, credential = line:match("^(%S+)%s+(%S+)$")
      if hostname then
         if line_no % nthreads == id then
            table.insert(agents, { hostname = hostname, auth = "Bearer " .. credential })
         end
         line_no = line_no + 1
      end
   end
   if #agents == 0 then
      error("no credentials for thread " .. id .. " in " .. file)
   end
   cursor = 0
   counter = 0
   started = os.time()
end

local function report()
   counter = counter + 1
   local op = string.format("op_%08x%08x%016x", id, started % 4294967296, counter)
   return string.format(
      '{"id":"%s","plan":"bench","kind":"backup","trigger":"schedule","status":"success",' ..
      '"started_at":%d,"finished_at":%d,"duration_ms":5000,"exit_code":0,' ..
      '"summary":{"files_new":3,"files_changed":1,"data_added":123456,"total_duration":5.0,' ..
      '"snapshot_id":"%064x"}}',
      op, started, started + 5, counter)
end

function request()
   cursor = cursor % #agents + 1
   local agent = agents[cursor]
   local reports = {}
   for i = 1, batch do
      reports[i] = report()
   end
   local body = '{"reports":[' .. table.concat(reports, ",") .. ']}'
   return wrk.format("POST", "/api/v1/agents/reports",
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
