-- Argo CD health check for kiln.dev/ImagePipeline (resource.customizations.health.kiln.dev_ImagePipeline).
-- Progressing: kiln has not reported on the current generation yet (no status, or
--   status.observedGeneration behind metadata.generation).
-- Degraded: Stalled=True (InvalidSpec, FailureBrake, PinnedVersionUnknown), with its message.
-- Suspended: spec.suspend is true (no new builds start) and the pipeline is not Degraded.
-- Progressing: Reconciling=True (the first build, or a build of a changed template, runs).
-- Healthy: Ready=True for this generation (a latest version exists); a scheduled
--   rebuild of an unchanged template keeps it Healthy.
-- Anything else (no version yet): Progressing.
local hs = {}
local generation = obj.metadata and obj.metadata.generation
local st = obj.status
if st == nil or st.observedGeneration == nil or (generation ~= nil and st.observedGeneration ~= generation) then
  hs.status = "Progressing"
  if st == nil or st.observedGeneration == nil then
    hs.message = "kiln has not reported on this ImagePipeline yet"
  else
    hs.message = "kiln has not observed generation " .. generation .. " yet (status is for generation " .. st.observedGeneration .. ")"
  end
  return hs
end

local function condition(kind)
  if st.conditions == nil then
    return nil
  end
  for _, c in ipairs(st.conditions) do
    if c.type == kind and (c.observedGeneration == nil or generation == nil or c.observedGeneration == generation) then
      return c
    end
  end
  return nil
end
local function is_true(c)
  return c ~= nil and c.status == "True"
end

local message = st.message or ""
local stalled = condition("Stalled")
if is_true(stalled) then
  hs.status = "Degraded"
  hs.message = stalled.message or message
  return hs
end

local ready = condition("Ready")
if obj.spec ~= nil and obj.spec.suspend == true then
  hs.status = "Suspended"
  local parts = { "suspended (spec.suspend): no new builds start" }
  if st.latestVersion ~= nil then
    table.insert(parts, "version " .. st.latestVersion .. " is the latest")
  end
  if message ~= "" and message ~= "suspended" then
    table.insert(parts, message)
  end
  hs.message = table.concat(parts, "; ")
  return hs
end

local reconciling = condition("Reconciling")
if is_true(reconciling) then
  hs.status = "Progressing"
  hs.message = reconciling.message or message
  return hs
end

if is_true(ready) then
  hs.status = "Healthy"
  hs.message = ready.message or message
  if message ~= "" and message ~= hs.message then
    hs.message = hs.message .. "; " .. message
  end
  return hs
end

hs.status = "Progressing"
if ready ~= nil and ready.message ~= nil then
  hs.message = ready.message
else
  hs.message = message
end
return hs
