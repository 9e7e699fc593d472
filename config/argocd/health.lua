-- Argo CD health check for kiln.dev/ImageBuild (resource.customizations.health.kiln.dev_ImageBuild).
-- Healthy: the image for the current spec exists (Ready=True for this generation).
-- Degraded: the current generation's build failed (Stalled=True).
-- Missing: kiln has not reported on the object yet. Anything else: Progressing.
local hs = {}
if obj.status == nil then
  hs.status = "Missing"
  hs.message = "kiln has not reported on this ImageBuild yet"
  return hs
end

local generation = obj.metadata and obj.metadata.generation
local function current(c)
  return c.observedGeneration == nil or generation == nil or c.observedGeneration == generation
end
local function condition(kind)
  if obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local message = obj.status.message or obj.status.phase or ""
local stalled = condition("Stalled")
if stalled ~= nil and stalled.status == "True" and current(stalled) then
  hs.status = "Degraded"
  hs.message = stalled.message or message
  return hs
end
local ready = condition("Ready")
local observed = obj.status.observedGeneration == nil or generation == nil or obj.status.observedGeneration == generation
if ready ~= nil and ready.status == "True" and current(ready) and observed then
  hs.status = "Healthy"
  hs.message = message
  return hs
end
hs.status = "Progressing"
hs.message = message
return hs
